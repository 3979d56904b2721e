// edgefleet dashboard: refresh the live part of a rollout page (no framework, no CDN).
(function () {
  "use strict";
  var box = document.querySelector("[data-poll]");
  if (!box) return;
  var url = box.getAttribute("data-poll");
  var delay = 1000;
  function poll() {
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (data) {
        box.innerHTML = data.html;
        box.setAttribute("data-state", data.state);
        delay = data.terminal ? 3000 : 1000;
      })
      .catch(function () { delay = Math.min(delay * 2, 15000); })
      .then(function () { setTimeout(poll, delay); });
  }
  setTimeout(poll, delay);
})();
