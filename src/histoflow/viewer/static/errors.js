// Script errors of the page kept in the DOM (body[data-errors]) and the console, so a headless browser's test sees them.
(function () {
  var errors = [];
  function record(message) {
    errors.push(String(message));
    var set = function () { document.body.setAttribute("data-errors", errors.join(" | ")); };
    if (document.body) { set(); } else { window.addEventListener("DOMContentLoaded", set); }
  }
  window.addEventListener("error", function (e) {
    record((e.message || "error") + " at " + (e.filename || (e.target && (e.target.src || e.target.href)) || "?"));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { record("unhandled rejection: " + e.reason); });
  window.HISTOFLOW_ERRORS = errors;
})();
