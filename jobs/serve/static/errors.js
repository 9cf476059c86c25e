"use strict";
// The errors page: the store's error counts and its newest error rows, from /stats.

function fill(table, rows, columns) {
  table.querySelector("tbody").replaceChildren(...rows.map((row) =>
    el("tr", {}, ...columns.map((c) => el("td", { class: c }, row[c] ?? "")))));
}

api("/stats").then((stats) => {
  document.getElementById("root").textContent = stats.root;
  const { total, counts, rows } = stats.errors;
  fill(document.getElementById("counts"), counts, ["modality", "model", "stage", "error_type", "rows"]);
  fill(document.getElementById("errors"), rows, ["id", "modality", "model", "stage", "error_type", "message", "job_id", "created_at"]);
  setStatus(total ? `${total} inputs failed; the newest ${rows.length} are listed` : "no errors: every input was embedded");
}).catch((err) => setStatus(`cannot read the store's stats: ${err.message}`, true));
