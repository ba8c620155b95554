// A slide in OpenSeadragon: its deep-zoom tiles, one overlay at a time (picker, opacity), the values under the pointer.
// When the slide and the overlay are drawn, body[data-ready] is set (the overlay's key, "none" without) and
// body[data-image-rect] holds the slide's level-0 extent in window pixels (left,top,right,bottom); body[data-opacity]
// is the overlay's opacity once set: what the browser test reads.
(function () {
  var data = window.HISTOFLOW_SLIDE;
  document.body.classList.add("slide");
  var image = Object.assign({}, data.dzi.Image, {Url: data.tiles});
  var width = Number(image.Size.Width);
  var viewer = OpenSeadragon({
    id: "viewer", prefixUrl: "../static/openseadragon/images/", drawer: "canvas", tileSources: {Image: image},
    showNavigator: true, navigatorOpacity: 1,  // opaque: the view behind it does not show through the slide
    imageSmoothingEnabled: false, animationTime: 0.3, crossOriginPolicy: false,
  });
  var select = document.getElementById("overlay"), opacity = document.getElementById("opacity");
  var readout = document.getElementById("readout"), shown = null, slideItem = null, adding = false;

  data.overlays.forEach(function (o) {
    var option = document.createElement("option");
    option.value = o.key;
    option.textContent = o.label;
    select.appendChild(option);
  });
  var none = document.createElement("option");
  none.value = "";
  none.textContent = "none";
  select.appendChild(none);
  select.value = data.default;

  function overlayByKey(key) { return data.overlays.filter(function (o) { return o.key === key; })[0]; }

  function markReady() {
    if (!slideItem || adding || !slideItem.getFullyLoaded() || (shown && !shown.getFullyLoaded())) { return; }
    var el = viewer.element.getBoundingClientRect();
    var size = slideItem.getContentSize();
    var a = slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    var b = slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(size.x, size.y));
    document.body.dataset.imageRect = [a.x + el.left, a.y + el.top, b.x + el.left, b.y + el.top]
      .map(function (v) { return v.toFixed(1); }).join(",");
    document.body.dataset.ready = select.value || "none";
  }

  function show(key) {
    if (shown) { viewer.world.removeItem(shown); shown = null; }
    var o = overlayByKey(key);
    if (!o) { markReady(); return; }
    var extent = data.maps[o.map].extent;
    adding = true;  // not ready until the new overlay is in the world (the slide alone would say so before)
    viewer.addTiledImage({
      tileSource: {type: "image", url: o.url}, x: 0, y: 0, width: extent.cols * extent.step / width,
      opacity: Number(opacity.value),
      success: function (event) {
        shown = event.item;
        adding = false;
        shown.addHandler("fully-loaded-change", markReady);
        markReady();
      },
      error: function (event) { adding = false; console.error("overlay " + o.url + ": " + event.message); },
    });
  }

  viewer.addHandler("open", function () {
    slideItem = viewer.world.getItemAt(0);
    slideItem.addHandler("fully-loaded-change", markReady);
    show(select.value);
  });
  viewer.addHandler("animation-finish", markReady);
  select.addEventListener("change", function () { show(select.value); });
  opacity.addEventListener("input", function () {
    if (shown) { shown.setOpacity(Number(opacity.value)); }
    document.body.dataset.opacity = opacity.value;
  });

  new OpenSeadragon.MouseTracker({
    element: viewer.element,
    moveHandler: function (event) {
      if (!slideItem) { return; }
      var p = slideItem.viewerElementToImageCoordinates(event.position);
      var parts = [];
      data.maps.forEach(function (m) {
        var col = Math.floor(p.x / m.extent.step), row = Math.floor(p.y / m.extent.step);
        var cell = (m.values[row] || [])[col];
        if (!cell || cell[0] === null) { return; }
        m.channels.forEach(function (c, i) {
          parts.push((m.kind === "attention" ? c : "P(" + c + ")") + " " + cell[i].toFixed(3));
        });
      });
      readout.textContent = "x " + Math.round(p.x) + " y " + Math.round(p.y) + (parts.length ? ": " + parts.join(", ") : "");
    },
  });
})();
