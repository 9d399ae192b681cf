// Live round progress on the study page: polls the progress JSON until the study ends, then
// reloads once so that results, payouts and the model link appear. Without JavaScript the page
// is a plain page that shows the same numbers on reload.
(function () {
  "use strict";
  var section = document.getElementById("progress");
  if (!section || section.dataset.terminal === "yes") return;
  var note = document.getElementById("live-note");
  note.textContent = "Live: updates every 2 seconds.";
  function show(p) {
    var status = document.getElementById("study-status");
    status.textContent = p.status;
    status.className = "status status-" + p.status;
    var bar = document.getElementById("round-progress");
    bar.max = p.rounds_planned; bar.value = p.rounds_completed;
    bar.textContent = p.rounds_completed + " of " + p.rounds_planned;
    document.getElementById("round-text").textContent = p.rounds_completed + " of " + p.rounds_planned;
    document.getElementById("approvals").textContent = p.approvals;
    document.getElementById("refusals").textContent = p.refusals;
  }
  function poll() {
    fetch(section.dataset.url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (p) {
        show(p);
        if (p.terminal) { note.textContent = "Study " + p.status + "."; window.location.reload(); }
        else { window.setTimeout(poll, 2000); }
      })
      .catch(function (e) { note.textContent = "Live updates stopped (" + e.message + "); reload the page."; });
  }
  window.setTimeout(poll, 1000);
})();
