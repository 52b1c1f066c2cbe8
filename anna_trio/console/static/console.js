// Auto-refresh: reload the page every 10 s while the box is ticked and the tab is
// visible; the choice is remembered in this browser. The console works without it.
(function () {
  "use strict";
  var box = document.getElementById("auto-refresh");
  if (!box) {
    return;
  }
  var key = "anna-console-auto-refresh";
  var timer = null;
  box.checked = window.localStorage.getItem(key) !== "off";
  function schedule() {
    window.clearTimeout(timer);
    if (!box.checked) {
      return;
    }
    timer = window.setTimeout(function () {
      if (document.hidden) {
        schedule();
      } else {
        window.location.reload();
      }
    }, 10000);
  }
  box.addEventListener("change", function () {
    window.localStorage.setItem(key, box.checked ? "on" : "off");
    schedule();
  });
  schedule();
})();
