/* Conveyor dashboard: fetch the overview's panels every few seconds and draw its two charts
   as SVG. No library; the pages work without this script, only without live updates. */
(function () {
  "use strict";

  var NS = "http://www.w3.org/2000/svg";
  var KEPT = 240; // depth samples kept: twelve minutes at one look every three seconds
  var depth = [];

  function node(name, attrs, parent) {
    var el = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (key) { el.setAttribute(key, attrs[key]); });
    if (parent) parent.appendChild(el);
    return el;
  }

  function clear(svg) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
  }

  function clock(ms) {
    var d = new Date(ms);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map(function (n) {
      return String(n).padStart(2, "0");
    }).join(":");
  }

  // A round top for the y axis, so its label reads well: 1, 2, 5, 10, 20, 50...
  function ceiling(value) {
    if (value <= 5) return 5;
    var size = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * size >= value) return steps[i] * size;
    }
    return 10 * size;
  }

  // The frame every chart shares: width from the page, a top line, a base line, labels.
  function frame(svg, top, first, last) {
    clear(svg);
    var width = svg.clientWidth || 600, height = svg.clientHeight || 170;
    var box = { left: 38, right: width - 6, top: 8, bottom: height - 18 };
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    node("line", { x1: box.left, x2: box.right, y1: box.top, y2: box.top, "class": "grid" }, svg);
    node("line", { x1: box.left, x2: box.right, y1: box.bottom, y2: box.bottom, "class": "grid" }, svg);
    node("text", { x: box.left - 4, y: box.top + 4, "text-anchor": "end" }, svg).textContent = String(top);
    node("text", { x: box.left - 4, y: box.bottom, "text-anchor": "end" }, svg).textContent = "0";
    if (first !== null) {
      node("text", { x: box.left, y: height - 3 }, svg).textContent = clock(first);
      node("text", { x: box.right, y: height - 3, "text-anchor": "end" }, svg).textContent = clock(last);
    }
    return box;
  }

  function drawThroughput(svg, points) {
    var top = ceiling(Math.max.apply(null, [0].concat(points.map(function (p) {
      return p.succeeded + p.failed;
    }))));
    var times = points.map(function (p) { return Date.parse(p.t); });
    var box = frame(svg, top, times.length ? times[0] : null, times.length ? times[times.length - 1] : null);
    var slot = (box.right - box.left) / Math.max(points.length, 1);
    var scale = (box.bottom - box.top) / top;
    var bars = 0;
    points.forEach(function (p, i) {
      var x = box.left + i * slot + 1, w = Math.max(slot - 2, 1);
      var ok = p.succeeded * scale, bad = p.failed * scale;
      var group = node("g", {}, svg);
      node("title", {}, group).textContent =
        clock(times[i]) + ": " + p.succeeded + " succeeded, " + p.failed + " failed";
      if (ok > 0) {
        node("rect", { x: x, y: box.bottom - ok, width: w, height: ok, "class": "bar-succeeded" }, group);
        bars++;
      }
      if (bad > 0) {
        node("rect", { x: x, y: box.bottom - ok - bad, width: w, height: bad, "class": "bar-failed" }, group);
        bars++;
      }
    });
    svg.setAttribute("data-bars", String(bars));
  }

  function drawDepth(svg, samples) {
    var keys = ["ready", "scheduled", "running"];
    var top = ceiling(Math.max.apply(null, [0].concat(samples.map(function (s) {
      return Math.max(s.ready, s.scheduled, s.running);
    }))));
    var box = frame(svg, top, samples.length ? samples[0].t : null,
      samples.length ? samples[samples.length - 1].t : null);
    var span = samples.length > 1 ? samples[samples.length - 1].t - samples[0].t : 1;
    var scale = (box.bottom - box.top) / top;
    keys.forEach(function (key) {
      var at = samples.map(function (s) {
        var x = samples.length > 1 ? box.left + (s.t - samples[0].t) / span * (box.right - box.left) : box.right;
        return x.toFixed(1) + "," + (box.bottom - s[key] * scale).toFixed(1);
      });
      if (at.length === 1) at.unshift(box.left + "," + at[0].split(",")[1]);
      node("polyline", { points: at.join(" "), "class": "line line-" + key, "data-key": key }, svg);
    });
    svg.setAttribute("data-samples", String(samples.length));
  }

  function redraw() {
    var data = document.getElementById("board-data");
    if (!data) return;
    var board = JSON.parse(data.textContent);
    if (board.ok) {
      var sample = { t: Date.parse(board.at) };
      Object.keys(board.depth).forEach(function (key) { sample[key] = board.depth[key]; });
      depth.push(sample);
      if (depth.length > KEPT) depth.splice(0, depth.length - KEPT);
    }
    var throughput = document.getElementById("throughput-chart");
    if (throughput) drawThroughput(throughput, board.throughput);
    var chart = document.getElementById("depth-chart");
    if (chart) drawDepth(chart, depth);
  }

  function say(text, lost) {
    var state = document.getElementById("live-state");
    if (!state) return;
    state.textContent = text;
    state.classList.toggle("lost", Boolean(lost));
  }

  function live(panels) {
    var url = panels.getAttribute("data-live");
    var every = parseFloat(panels.getAttribute("data-every")) * 1000 || 3000;
    function look() {
      if (document.hidden) { setTimeout(look, every); return; }
      fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (response) {
          if (!response.ok || response.redirected) throw new Error("HTTP " + response.status);
          return response.text();
        })
        .then(function (html) {
          panels.innerHTML = html;
          redraw();
          say("live · " + clock(Date.now()));
        })
        .catch(function () { say("not updating: the page cannot reach the server", true); })
        .then(function () { setTimeout(look, every); });
    }
    say("live · " + clock(Date.now()));
    setTimeout(look, every);
  }

  // Buttons that change something ask first when they say so.
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });

  document.addEventListener("change", function (event) {
    if (event.target.hasAttribute("data-submit-on-change")) event.target.form.submit();
  });

  document.addEventListener("DOMContentLoaded", function () {
    redraw();
    window.addEventListener("resize", function () {
      var data = document.getElementById("board-data");
      if (data) { depth.pop(); redraw(); }
    });
    var panels = document.getElementById("panels");
    if (panels) live(panels);
  });
})();
