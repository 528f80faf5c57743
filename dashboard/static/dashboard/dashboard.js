// Live dashboard: every few seconds, fetch the panels' HTML fragment and swap it in.
// No framework, no CDN. With JavaScript off the page is still complete (server-rendered).
(function () {
  "use strict";
  var root = document.getElementById("dashboard-panels");
  if (!root || !window.fetch) return;
  var url = root.getAttribute("data-refresh-url");
  var every = parseInt(root.getAttribute("data-refresh-ms"), 10) || 2500;
  var live = document.getElementById("dash-live");
  var busy = false;

  function say(text, stale) {
    if (!live) return;
    live.textContent = text;
    live.classList.toggle("dash-stale", !!stale);
  }

  function now() {
    return new Date().toLocaleTimeString();
  }

  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(url, { credentials: "same-origin", cache: "no-store", headers: { "X-Requested-With": "XMLHttpRequest" } })
      .then(function (response) {
        // Only our fragment is swapped in: an expired session answers with the login page.
        if (!response.ok || response.headers.get("X-Dashboard-Fragment") !== "1") {
          throw new Error(response.redirected ? "session expired: reload the page" : "HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        root.innerHTML = html;
        say("Live: refreshed at " + now() + ", every " + every / 1000 + " s.", false);
      })
      .catch(function (error) {
        say("Refresh failed at " + now() + " (" + error.message + "); retrying.", true);
      })
      .then(function () {
        busy = false;
      });
  }

  say("Live: refreshing every " + every / 1000 + " s.", false);
  window.setInterval(refresh, every);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) refresh();
  });
})();
