/* The feature index: one table over every feature, sorted, filtered and paginated
 * in the browser from the column arrays in data/index.js. Only one page of rows is
 * ever in the DOM, so 100,000 features stay fast. */
(function () {
  "use strict";
  var LS = window.LLM_SAE, el = LS.el;
  var meta = window.LLM_SAE_META || {};
  var idx = window.LLM_SAE_INDEX;
  LS.header("index");
  var main = document.querySelector("main");
  if (!idx) { LS.showError(main, "data/index.js did not load: rebuild the site with `llm-sae dashboard`."); return; }

  var n = idx.id.length;
  var state = { key: "id", desc: false, page: 0, size: 100, query: "", hideDead: false, dmin: null, dmax: null };
  var view = []; // the filtered, sorted rows
  var lowerTop = null; // lowercased top-token text, built on first search
  // Explanations from `llm-sae explain`, when the site was built with them: two more
  // columns (score sortable), and the search also looks in the explanation text.
  var hasExpl = !!(idx && idx.expl && idx.score);
  var lowerExpl = null;
  if (hasExpl) {
    var hidden = document.querySelectorAll(".expl-col, #expl-search");
    for (var hx = 0; hx < hidden.length; hx++) hidden[hx].hidden = false;
    LS.$("search").placeholder = "tokens or explanation text";
  }

  document.title = (meta.sae_name ? meta.sae_name + " · " : "") + "SAE features";
  LS.$("title").textContent = "Features" + (meta.sae_name ? " of " + meta.sae_name : "");

  // ---- summary cards -----------------------------------------------------
  (function summary() {
    var box = LS.$("summary");
    var nDead = 0;
    for (var i = 0; i < n; i++) nDead += idx.dead[i] ? 1 : 0;
    var cards = [["features", String(n)], ["dead", nDead + "", n ? (100 * nDead / n).toFixed(1) + "%" : ""]];
    if (meta.n_dense) cards.push(["dense", String(meta.n_dense), n ? (100 * meta.n_dense / n).toFixed(1) + "%" : ""]);
    if (meta.tokens_analysed) cards.push(["tokens analysed", String(meta.tokens_analysed)]);
    var metrics = meta.metrics || {};
    var names = { l0: "L0", fvu: "FVU", mse: "MSE", loss_recovered: "loss recovered", dense_fraction: "dense" };
    for (var k in names) if (metrics[k] !== undefined && metrics[k] !== null) cards.push([names[k], LS.fmt(metrics[k], 4)]);
    for (var j = 0; j < cards.length; j++) {
      var v = el("div", { cls: "v", text: cards[j][1] });
      if (cards[j][2]) v.appendChild(el("span", { cls: "sub", text: " " + cards[j][2] }));
      box.appendChild(el("div", { cls: "stat" }, [el("div", { cls: "k", text: cards[j][0] }), v]));
    }
  })();

  // ---- density histogram (log10), click a bar to filter to it -----------
  (function densityHistogram() {
    var lo = 0, hi = -Infinity, logs = [];
    for (var i = 0; i < n; i++) {
      if (idx.density[i] > 0) { var l = Math.log10(idx.density[i]); logs.push(l); hi = Math.max(hi, l); }
    }
    var panel = LS.$("density-hist");
    if (!logs.length) { panel.appendChild(el("p", { cls: "muted", text: "No feature fired." })); return; }
    lo = Math.floor(Math.min.apply(null, logs.slice(0, 200000)) * 4) / 4;
    for (var q = 200000; q < logs.length; q += 200000) lo = Math.min(lo, Math.floor(Math.min.apply(null, logs.slice(q, q + 200000)) * 4) / 4);
    hi = Math.max(lo + 0.25, Math.ceil(hi * 4) / 4 + (hi === Math.ceil(hi * 4) / 4 ? 0.25 : 0));
    var nb = Math.round((hi - lo) / 0.25), counts = [], edges = [];
    for (var b = 0; b <= nb; b++) edges.push(lo + b * 0.25);
    for (b = 0; b < nb; b++) counts.push(0);
    logs.forEach(function (l) { counts[Math.min(nb - 1, Math.floor((l - lo) / 0.25))]++; });
    panel.appendChild(LS.histogram(edges, counts, {
      height: 150,
      xlabel: "log10 density",
      tick: function (e) { return e === undefined ? "" : (Math.round(e * 100) / 100).toString(); },
      onbar: function (j) {
        var a = Math.pow(10, edges[j]), z = Math.pow(10, edges[j + 1]);
        LS.$("dmin").value = parseFloat(a.toPrecision(4)); LS.$("dmax").value = parseFloat(z.toPrecision(4));
        state.dmin = a; state.dmax = z; recompute();
      },
    }));
  })();

  // ---- filtering and sorting ---------------------------------------------
  function topText(i) { return (idx.top[i] || []).join("\u0001"); }
  function matches(i, q) {
    if (!lowerTop) { lowerTop = new Array(n); for (var j = 0; j < n; j++) lowerTop[j] = topText(j).toLowerCase(); }
    if (lowerTop[i].indexOf(q) !== -1) return true;
    if (!hasExpl || !LS.$("search-expl").checked) return false;
    if (!lowerExpl) { lowerExpl = new Array(n); for (var e = 0; e < n; e++) lowerExpl[e] = (idx.expl[e] || "").toLowerCase(); }
    return lowerExpl[i].indexOf(q) !== -1;
  }
  // The search box accepts the visible forms too: '·' means space, '↵' newline, '→' tab.
  function normaliseQuery(q) {
    return q.replace(/\u00b7/g, " ").replace(/\u21b5/g, "\n").replace(/\u2192/g, "\t").toLowerCase();
  }

  function keyArray(key) {
    if (key === "top") return null;
    return idx[key];
  }

  function recompute() {
    var q = normaliseQuery(state.query);
    var rows = [];
    for (var i = 0; i < n; i++) {
      if (state.hideDead && idx.dead[i]) continue;
      var d = idx.density[i];
      if (state.dmin !== null && !(d >= state.dmin)) continue;
      if (state.dmax !== null && !(d <= state.dmax)) continue;
      if (q && !matches(i, q)) continue;
      rows.push(i);
    }
    var arr = keyArray(state.key), sign = state.desc ? -1 : 1, ids = idx.id;
    if (arr) {
      rows.sort(function (a, b) {
        var x = arr[a], y = arr[b];
        if (x === null) x = -Infinity; if (y === null) y = -Infinity;
        return x < y ? -sign : x > y ? sign : ids[a] - ids[b];
      });
    } else {
      var first = function (i) { return ((idx.top[i] && idx.top[i][0]) || "").toLowerCase(); };
      rows.sort(function (a, b) {
        var x = first(a), y = first(b);
        return x < y ? -sign : x > y ? sign : ids[a] - ids[b];
      });
    }
    view = rows;
    state.page = 0;
    render();
  }

  // ---- rendering ---------------------------------------------------------
  var tbody = LS.$("rows");
  var maxDensity = 0;
  for (var i = 0; i < n; i++) if (idx.density[i] > maxDensity) maxDensity = idx.density[i];

  function render() {
    var pages = Math.max(1, Math.ceil(view.length / state.size));
    if (state.page >= pages) state.page = pages - 1;
    var start = state.page * state.size, stop = Math.min(view.length, start + state.size);
    var frag = document.createDocumentFragment();
    for (var r = start; r < stop; r++) {
      var i = view[r], id = idx.id[i], dead = !!idx.dead[i];
      var tr = el("tr", { cls: dead ? "dead" : null, "data-id": id });
      tr.appendChild(el("td", { cls: "num" }, [el("a", { href: "feature.html#" + id, text: String(id) })]));
      var w = maxDensity > 0 ? Math.max(1, Math.round(60 * Math.sqrt(idx.density[i] / maxDensity))) : 0;
      tr.appendChild(el("td", { cls: "num" }, [el("span", { cls: "densbar", style: "width:" + (idx.density[i] > 0 ? w : 0) + "px" }), LS.fmtDensity(idx.density[i])]));
      tr.appendChild(el("td", { cls: "num", text: LS.fmt(idx.max_act[i]) }));
      var tops = el("td", { cls: "tops" });
      var toks = idx.top[i] || [];
      for (var t = 0; t < toks.length; t++) tops.appendChild(LS.chip(toks[t]));
      tr.appendChild(tops);
      tr.appendChild(el("td", null, [dead ? el("span", { cls: "badge dead", text: "dead" }) : null]));
      if (hasExpl) {
        tr.appendChild(el("td", { cls: "num", text: idx.score[i] === null ? "" : LS.fmt(idx.score[i], 3) }));
        tr.appendChild(el("td", { cls: "expl", text: idx.expl[i] || "" }));
      }
      frag.appendChild(tr);
    }
    LS.clear(tbody).appendChild(frag);
    LS.$("page-info").textContent = view.length ? (start + 1) + "–" + stop + " of " + view.length + " (page " + (state.page + 1) + " of " + pages + ")" : "no features match";
    LS.$("count").textContent = view.length === n ? n + " features" : view.length + " of " + n + " features";
    saveState();
    LS.$("prev-page").disabled = state.page === 0;
    LS.$("next-page").disabled = state.page >= pages - 1;
    var ths = document.querySelectorAll("th.sortable");
    for (var h = 0; h < ths.length; h++) {
      var th = ths[h], old = th.querySelector(".arrow");
      if (old) th.removeChild(old);
      if (th.getAttribute("data-key") === state.key) th.appendChild(el("span", { cls: "arrow", text: state.desc ? "▼" : "▲" }));
      th.setAttribute("aria-sort", th.getAttribute("data-key") === state.key ? (state.desc ? "descending" : "ascending") : "none");
    }
  }

  // ---- controls ----------------------------------------------------------
  var ths = document.querySelectorAll("th.sortable");
  for (var h = 0; h < ths.length; h++) {
    ths[h].addEventListener("click", function () {
      var key = this.getAttribute("data-key");
      // Numbers are most interesting largest-first; ids and text smallest-first.
      if (state.key === key) state.desc = !state.desc;
      else { state.key = key; state.desc = key === "density" || key === "max_act" || key === "dead" || key === "score"; }
      recompute();
    });
  }
  var timer = null;
  LS.$("search").addEventListener("input", function () {
    var v = this.value;
    clearTimeout(timer);
    timer = setTimeout(function () { state.query = v; recompute(); }, 120);
  });
  LS.$("hide-dead").addEventListener("change", function () { state.hideDead = this.checked; recompute(); });
  LS.$("search-expl").addEventListener("change", function () { recompute(); });
  function num(v) { return v === "" || isNaN(parseFloat(v)) ? null : parseFloat(v); }
  LS.$("dmin").addEventListener("input", function () { state.dmin = num(this.value); recompute(); });
  LS.$("dmax").addEventListener("input", function () { state.dmax = num(this.value); recompute(); });
  LS.$("prev-page").addEventListener("click", function () { state.page--; render(); window.scrollTo(0, 0); });
  LS.$("next-page").addEventListener("click", function () { state.page++; render(); window.scrollTo(0, 0); });
  LS.$("page-size").addEventListener("change", function () { state.size = parseInt(this.value, 10); state.page = 0; render(); });
  LS.$("jump").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && this.value !== "") location.href = "feature.html#" + parseInt(this.value, 10);
  });

  // ---- the view lives in the URL hash, so Back from a feature page returns to it
  function saveState() {
    var p = new URLSearchParams();
    if (state.key !== "id" || state.desc) { p.set("sort", state.key); if (state.desc) p.set("desc", "1"); }
    if (state.query) p.set("q", state.query);
    if (state.hideDead) p.set("live", "1");
    if (state.dmin !== null) p.set("dmin", String(state.dmin));
    if (state.dmax !== null) p.set("dmax", String(state.dmax));
    if (state.size !== 100) p.set("size", String(state.size));
    if (state.page) p.set("page", String(state.page + 1));
    var h = p.toString();
    if (h !== location.hash.replace(/^#/, "")) history.replaceState(null, "", h ? "#" + h : location.pathname + location.search);
  }
  function loadState() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    var key = p.get("sort");
    if (key && document.querySelector('th[data-key="' + (/^[a-z_]+$/.test(key) ? key : "") + '"]')) state.key = key;
    state.desc = p.get("desc") === "1";
    state.query = p.get("q") || "";
    state.hideDead = p.get("live") === "1";
    state.dmin = num(p.get("dmin") || "");
    state.dmax = num(p.get("dmax") || "");
    var size = parseInt(p.get("size") || "100", 10);
    if ([50, 100, 250, 1000].indexOf(size) >= 0) state.size = size;
    LS.$("search").value = state.query;
    LS.$("hide-dead").checked = state.hideDead;
    LS.$("dmin").value = state.dmin === null ? "" : state.dmin;
    LS.$("dmax").value = state.dmax === null ? "" : state.dmax;
    LS.$("page-size").value = String(state.size);
    return Math.max(0, (parseInt(p.get("page") || "1", 10) || 1) - 1);
  }

  var startPage = loadState();
  recompute();
  if (startPage) { state.page = startPage; render(); }
  window.LLM_SAE_READY = true;
})();
