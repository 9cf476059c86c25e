"""`mmembed serve`: a read-only retrieval API and search page over a store, on Starlette and uvicorn.

    app.py         create_app(root): the routes, the error handlers, the body cap; serve() and background()
    routes.py      the JSON API (POST /search, GET /items/{key}, /media/{key}, /thumbs/{key}, /stats) and the pages
    thumbnails.py  image thumbnails made on the fly, cached in memory (never in the store)
    static/        the search page and the errors page: plain HTML, CSS and JS, no build step, nothing fetched

Every answer comes from jobs.api (the library behind `query`, `classify` and `sql`); nothing here reads the store
by itself or writes to it.
"""
