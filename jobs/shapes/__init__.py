"""The demo model's tools, outside the runtime import path: `render` draws captioned shapes, `train` trains
shapes-clip on them (`python -m jobs.shapes.train --out encoders/bundled/shapes-clip.parquet`)."""
