(function () {
  // Unit cards: IoU descending (ties by unit), unit ascending, label (code-point order; ties by
  // IoU descending, then unit).
  var cmp = {
    iou: function (a, b) { return (+b.dataset.iou - +a.dataset.iou) || (+a.dataset.unit - +b.dataset.unit); },
    unit: function (a, b) { return +a.dataset.unit - +b.dataset.unit; },
    label: function (a, b) {
      var x = a.dataset.label, y = b.dataset.label;
      if (x < y) return -1;
      if (x > y) return 1;
      return (+b.dataset.iou - +a.dataset.iou) || (+a.dataset.unit - +b.dataset.unit);
    }
  };
  document.querySelectorAll("button.sort").forEach(function (button) {
    button.addEventListener("click", function () {
      var grid = document.getElementById(button.dataset.grid);
      var cards = Array.prototype.slice.call(grid.querySelectorAll(":scope > .card"));
      cards.sort(cmp[button.dataset.key]);
      cards.forEach(function (card) { grid.appendChild(card); });
      grid.dataset.sorted = button.dataset.key;
      button.parentNode.querySelectorAll("button.sort").forEach(function (other) {
        other.setAttribute("aria-pressed", other === button ? "true" : "false");
      });
    });
  });
  // The table of every unit: rows whose text contains the filter's words (all of them, any
  // case) and that pass the "show" choice (detectors, FDR detectors, with a card, formula
  // detectors: the row's data-detector / data-fdr / data-card / data-formula is 1).
  function filterUnits(id) {
    var table = document.getElementById(id);
    var box = document.querySelector('input.units-filter[data-table="' + id + '"]');
    var show = document.querySelector('select.units-show[data-table="' + id + '"]');
    var words = box.value.toLowerCase().split(/\s+/).filter(Boolean);
    var rows = Array.prototype.slice.call(table.tBodies[0].rows), shown = 0;
    rows.forEach(function (r) {
      var text = r.textContent.toLowerCase();
      var ok = words.every(function (w) { return text.indexOf(w) >= 0; }) &&
        (show.value === "all" || r.dataset[show.value] === "1");
      r.hidden = !ok;
      if (ok) shown += 1;
    });
    document.querySelector('.units-count[data-table="' + id + '"]').textContent =
      shown + " of " + rows.length + " units shown";
  }
  document.querySelectorAll("input.units-filter, select.units-show").forEach(function (el) {
    el.addEventListener(el.tagName === "SELECT" ? "change" : "input", function () {
      filterUnits(el.dataset.table);
    });
  });
  // Tables with sortable columns: a click sorts by that column (numbers descending first, text
  // ascending first); a second click reverses. Ties keep the written order (by the first cells).
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = Array.prototype.slice.call(table.querySelectorAll("thead th"));
    heads.forEach(function (th, col) {
      th.classList.add("sortable");
      th.addEventListener("click", function () {
        var numeric = th.dataset.type === "number";
        var dir = th.getAttribute("aria-sort") === (numeric ? "descending" : "ascending")
          ? (numeric ? "ascending" : "descending") : (numeric ? "descending" : "ascending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.forEach(function (r, i) { if (r.dataset.order === undefined) r.dataset.order = i; });
        rows.sort(function (a, b) {
          var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value, c;
          // an empty value (n/a) goes last in either direction
          if ((x === "") !== (y === "")) return x === "" ? 1 : -1;
          if (numeric) c = +x - +y; else c = x < y ? -1 : (x > y ? 1 : 0);
          if (dir === "descending") c = -c;
          return c || (+a.dataset.order - +b.dataset.order);
        });
        rows.forEach(function (r) { body.appendChild(r); });
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir);
      });
    });
  });
})();
