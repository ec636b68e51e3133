/* Shared helpers for the llm_sae dashboard pages.
 *
 * Token text is untrusted (it comes from whatever the model was fed), so every
 * string from the data reaches the page through textContent or setAttribute,
 * never through innerHTML. Data files are plain <script>s (not fetch()), because
 * browsers refuse fetch() of file:// URLs and the site must work opened from disk.
 */
(function () {
  "use strict";
  var LS = (window.LLM_SAE = window.LLM_SAE || {});

  // ---- DOM building ------------------------------------------------------
  LS.el = function (tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (!Object.prototype.hasOwnProperty.call(attrs, k)) continue;
        var v = attrs[k];
        if (v === null || v === undefined || v === false) continue;
        if (k === "text") node.textContent = String(v);
        else if (k === "cls") node.className = v;
        else if (k === "style") node.style.cssText = v;
        else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, String(v));
      }
    }
    if (children) {
      for (var i = 0; i < children.length; i++) {
        var c = children[i];
        if (c === null || c === undefined) continue;
        node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
      }
    }
    return node;
  };
  LS.clear = function (node) { while (node.firstChild) node.removeChild(node.firstChild); return node; };
  LS.$ = function (id) { return document.getElementById(id); };

  // ---- numbers -----------------------------------------------------------
  LS.fmt = function (x, digits) {
    if (x === null || x === undefined || (typeof x === "number" && isNaN(x))) return "–";
    if (typeof x !== "number") return String(x);
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e5 || a < 1e-3) return x.toExponential((digits || 3) - 1);
    return String(parseFloat(x.toPrecision(digits || 3)));
  };
  LS.fmtDensity = function (d) {
    if (d === null || d === undefined) return "–";
    if (d === 0) return "0";
    if (d >= 1e-4) return parseFloat((d * 100).toPrecision(3)) + "%";
    return d.toExponential(2);
  };

  // ---- tokens ------------------------------------------------------------
  // Characters that would be invisible or would reorder the line (bidi overrides)
  // are shown as named placeholders so a token can never break the layout.
  var INVISIBLE = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u00ad\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]/;

  function codepoint(ch) {
    var h = ch.charCodeAt(0).toString(16).toUpperCase();
    while (h.length < 4) h = "0" + h;
    return "U+" + h;
  }

  // Split a token into visible display pieces: [text, className] pairs.
  LS.tokenPieces = function (s) {
    s = String(s);
    var out = [];
    var plain = "";
    function flush() { if (plain) { out.push([plain, null]); plain = ""; } }
    for (var i = 0; i < s.length; i++) {
      var ch = s[i];
      if (ch === " ") { flush(); out.push(["\u00b7", "ws"]); }
      else if (ch === "\n") { flush(); out.push(["\u21b5", "ws"]); }
      else if (ch === "\t") { flush(); out.push(["\u2192", "ws"]); }
      else if (ch === "\r") { flush(); out.push(["\u240d", "ws"]); }
      else if (INVISIBLE.test(ch)) { flush(); out.push(["\u27e8" + codepoint(ch) + "\u27e9", "ctrl"]); }
      else plain += ch;
    }
    flush();
    if (!out.length) out.push(["\u2205", "ctrl"]); // the empty token
    return out;
  };

  // The token's real characters, escaped like a string literal, for tooltips.
  LS.tokenRepr = function (s) {
    var r = JSON.stringify(String(s));
    return r.replace(/[\u007f-\u009f\u00ad\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]/g, function (ch) {
      return "\\u" + codepoint(ch).slice(2);
    });
  };

  // Fill `node` with the visible form of token `s`.
  LS.fillToken = function (node, s) {
    var pieces = LS.tokenPieces(s);
    for (var i = 0; i < pieces.length; i++) {
      if (pieces[i][1]) node.appendChild(LS.el("span", { cls: pieces[i][1], text: pieces[i][0] }));
      else node.appendChild(document.createTextNode(pieces[i][0]));
    }
    return node;
  };

  LS.chip = function (s) {
    var c = LS.el("span", { cls: "chip", title: LS.tokenRepr(s) });
    return LS.fillToken(c, s);
  };

  // Orange shade whose opacity is the activation relative to the feature's max.
  LS.actColor = function (act, max) {
    if (!(act > 0) || !(max > 0)) return "";
    var a = Math.min(1, act / max);
    return "rgba(234, 88, 12, " + (0.08 + 0.82 * a).toFixed(3) + ")";
  };

  // One <span> per token, shaded; hovering shows the shared tooltip.
  LS.tokenSpan = function (s, act, max) {
    var span = LS.el("span", { cls: act === null || act === undefined ? "tok na" : "tok" });
    LS.fillToken(span, s);
    var bg = LS.actColor(act, max);
    if (bg) span.style.backgroundColor = bg;
    var tip = LS.tooltipText(s, act);
    span.setAttribute("title", tip);
    span._tip = tip;
    return span;
  };
  LS.tooltipText = function (s, act) {
    var a = act === null || act === undefined ? "none (no stored row here)" : LS.fmt(act, 4);
    return "token " + LS.tokenRepr(s) + "\nactivation " + a;
  };

  // ---- histograms as inline SVG (no chart library) ----------------------
  var SVGNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    var n = document.createElementNS(SVGNS, tag);
    for (var k in attrs) n.setAttribute(k, String(attrs[k]));
    if (text !== undefined) n.textContent = text;
    return n;
  }
  // opts: logY, xlabel, tick (edge -> label), onbar (bin index -> void), height
  LS.histogram = function (edges, counts, opts) {
    opts = opts || {};
    var tick = opts.tick || function (e) { return LS.fmt(e); };
    var W = 560, H = opts.height || 190, L = 44, R = 10, T = 10, B = 34;
    var s = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": opts.xlabel || "histogram" });
    var maxC = 0;
    for (var i = 0; i < counts.length; i++) maxC = Math.max(maxC, counts[i]);
    var yv = function (c) { return opts.logY ? (c > 0 ? Math.log10(c + 1) : 0) : c; };
    var top = yv(maxC) || 1;
    var bw = (W - L - R) / Math.max(1, counts.length);
    s.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, "class": "axis" }));
    s.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, "class": "axis" }));
    counts.forEach(function (c, j) {
      var bh = (H - T - B) * yv(c) / top;
      // A full-height transparent hit area makes thin bars easy to hover and click.
      var g = svg("g", { "class": "bin" + (opts.onbar ? " clickable" : "") });
      g.appendChild(svg("rect", { "class": "hit", x: (L + j * bw).toFixed(2), y: T, width: bw.toFixed(2), height: H - B - T }));
      g.appendChild(svg("rect", { "class": "bar", x: (L + j * bw + 0.5).toFixed(2), y: (H - B - bh).toFixed(2), width: Math.max(0.5, bw - 1).toFixed(2), height: Math.max(0, bh).toFixed(2) }));
      g.appendChild(svg("title", {}, "[" + tick(edges[j]) + ", " + tick(edges[j + 1]) + "): " + c));
      if (opts.onbar) g.addEventListener("click", function () { opts.onbar(j); });
      s.appendChild(g);
    });
    if (edges.length) {
      var ticks = [0, Math.floor((edges.length - 1) / 2), edges.length - 1];
      for (var t = 0; t < ticks.length; t++) {
        s.appendChild(svg("text", { x: L + ticks[t] * bw, y: H - B + 14, "text-anchor": t === 0 ? "start" : t === 2 ? "end" : "middle" }, tick(edges[ticks[t]])));
      }
    }
    s.appendChild(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, String(maxC)));
    s.appendChild(svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
    if (opts.xlabel) s.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, opts.xlabel + (opts.logY ? ", log count" : "")));
    return s;
  };

  // ---- the shared tooltip ------------------------------------------------
  var tipNode = null;
  function tooltip() {
    if (!tipNode) {
      tipNode = LS.el("div", { id: "tooltip", role: "tooltip" });
      document.body.appendChild(tipNode);
    }
    return tipNode;
  }
  LS.showTooltip = function (text, x, y) {
    var t = tooltip();
    t.textContent = text;
    t.style.display = "block";
    var w = t.offsetWidth, h = t.offsetHeight;
    var left = Math.min(x + 12, window.innerWidth - w - 8);
    var top = y + 16 + h > window.innerHeight ? y - h - 10 : y + 16;
    t.style.left = Math.max(4, left) + "px";
    t.style.top = Math.max(4, top) + "px";
  };
  LS.hideTooltip = function () { if (tipNode) tipNode.style.display = "none"; };
  document.addEventListener("mouseover", function (e) {
    var n = e.target;
    while (n && n !== document && !n._tip) n = n.parentNode;
    if (n && n._tip) LS.showTooltip(n._tip, e.clientX, e.clientY);
    else LS.hideTooltip();
  });
  document.addEventListener("mousemove", function (e) {
    if (tipNode && tipNode.style.display === "block") {
      var n = e.target;
      while (n && n !== document && !n._tip) n = n.parentNode;
      if (n && n._tip) LS.showTooltip(n._tip, e.clientX, e.clientY);
    }
  });

  // ---- data loading through <script> tags --------------------------------
  LS.loadScript = function (src) {
    return new Promise(function (resolve, reject) {
      var s = document.createElement("script");
      s.src = src;
      s.async = true;
      s.onload = function () { s.parentNode && s.parentNode.removeChild(s); resolve(); };
      s.onerror = function () { s.parentNode && s.parentNode.removeChild(s); reject(new Error("could not load " + src)); };
      document.head.appendChild(s);
    });
  };

  function pad(n, w) { var s = String(n); while (s.length < w) s = "0" + s; return s; }
  LS.featurePath = function (id) {
    var m = window.LLM_SAE_META || {};
    var shard = m.shard_size || 1000;
    return "data/features/" + pad(Math.floor(id / shard), 3) + "/f_" + pad(id, 6) + ".js";
  };

  var features = {};
  var waiting = {};
  // Each feature file calls this with its id and data.
  window.LLM_SAE_FEATURE = function (id, data) {
    features[id] = data;
    if (waiting[id]) { waiting[id].forEach(function (f) { f(data); }); delete waiting[id]; }
  };
  LS.loadFeature = function (id) {
    if (features[id]) return Promise.resolve(features[id]);
    return new Promise(function (resolve, reject) {
      (waiting[id] = waiting[id] || []).push(resolve);
      LS.loadScript(LS.featurePath(id)).then(function () {
        if (!features[id]) reject(new Error("feature " + id + " file did not register its data"));
      }, reject);
    });
  };

  // ---- header ------------------------------------------------------------
  LS.header = function (active) {
    var m = window.LLM_SAE_META || {};
    var bar = LS.el("header", { cls: "topbar" });
    bar.appendChild(LS.el("div", { cls: "brand" }, ["llm_sae ", LS.el("span", { text: "features" })]));
    var nav = LS.el("nav");
    nav.appendChild(LS.el("a", { href: "index.html", cls: active === "index" ? "active" : null, text: "Index" }));
    var live = LS.el("a", { href: "live.html", id: "live-link", cls: active === "live" ? "active" : null, text: "Live", style: "display:none" });
    nav.appendChild(live);
    bar.appendChild(nav);
    var meta = LS.el("div", { cls: "meta" });
    var info = [
      ["model", m.model], ["hook", m.hook], ["SAE", m.sae_name], ["arch", m.architecture],
      ["latents", m.n_latents], ["k", m.k], ["d_in", m.d_in],
    ];
    for (var i = 0; i < info.length; i++) {
      if (info[i][1] === undefined || info[i][1] === null || info[i][1] === "") continue;
      meta.appendChild(LS.el("span", null, [info[i][0] + " ", LS.el("b", { text: String(info[i][1]), title: String(info[i][1]) })]));
    }
    bar.appendChild(meta);
    document.body.insertBefore(bar, document.body.firstChild);
    // The live view exists only under `llm-sae serve --sae ... --model ...`.
    if (location.protocol === "http:" || location.protocol === "https:") {
      fetch("api/info").then(function (r) { return r.ok ? r.json() : null; }).then(function (j) {
        if (j && j.live) live.style.display = "";
      }).catch(function () {});
    }
    return bar;
  };

  LS.showError = function (parent, message) {
    LS.clear(parent).appendChild(LS.el("div", { cls: "error", text: message }));
  };
})();
