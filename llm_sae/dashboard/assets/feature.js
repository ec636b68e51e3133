/* One feature's page: feature.html#<id> loads data/features/<shard>/f_<id>.js on demand. */
(function () {
  "use strict";
  var LS = window.LLM_SAE, el = LS.el;
  var meta = window.LLM_SAE_META || {};
  LS.header("feature");
  var root = LS.$("feature");
  var current = null;

  function currentId() {
    var h = decodeURIComponent(location.hash.replace(/^#/, ""));
    var m = /^\d+$/.exec(h);
    return m ? parseInt(h, 10) : null;
  }

  function go(id) { if (id !== null && id !== undefined && !isNaN(id)) location.hash = "#" + id; }

  function stat(k, v) { return el("div", { cls: "stat" }, [el("div", { cls: "k", text: k }), el("div", { cls: "v", text: v })]); }

  // ---- examples -----------------------------------------------------------
  function exampleRow(ex, vocab, max) {
    var row = el("div", { cls: "example" });
    var toks = ex.t || [], acts = ex.a || [];
    var peak = ex.p, best = ex.v;
    if (peak === undefined) {
      peak = -1; best = -Infinity;
      for (var i = 0; i < acts.length; i++) if (acts[i] !== null && acts[i] > best) { best = acts[i]; peak = i; }
    }
    if (best === undefined) best = acts[peak];
    row.appendChild(el("span", { cls: "exmeta", text: LS.fmt(best) }));
    for (var j = 0; j < toks.length; j++) {
      var s = typeof toks[j] === "number" ? vocab[toks[j]] : toks[j];
      var a = acts[j] === undefined ? null : acts[j];
      var span = LS.tokenSpan(s === undefined ? "" : s, a, max);
      if (j === peak && best > 0) span.className += " peak";
      row.appendChild(span);
    }
    return row;
  }

  function logitTable(rows, cls) {
    var t = el("table", { cls: "logits" });
    for (var i = 0; i < rows.length; i++) {
      t.appendChild(el("tr", null, [el("td", null, [LS.chip(rows[i][0])]), el("td", { cls: "num " + cls, text: (rows[i][1] > 0 ? "+" : "") + LS.fmt(rows[i][1]) })]));
    }
    if (!rows.length) t.appendChild(el("tr", null, [el("td", { cls: "muted", text: "none" })]));
    return t;
  }

  // The explanation written by `llm-sae explain` and its scores (balanced accuracy, 0.5 = chance).
  function explanationPanel(x) {
    var p = el("div", { cls: "panel", id: "explanation" });
    p.appendChild(el("h2", null, ["Explanation ", x.model ? el("span", { cls: "muted", style: "font-weight:400;font-size:12px", text: "by " + x.model }) : null]));
    p.appendChild(el("p", { cls: "expl-text", text: x.text }));
    var sc = x.scores || {}, parts = [];
    for (var k in sc) if (Object.prototype.hasOwnProperty.call(sc, k)) parts.push(k + " " + (sc[k] === null ? "–" : LS.fmt(sc[k], 3)));
    if (parts.length) p.appendChild(el("p", { cls: "muted", text: "balanced accuracy: " + parts.join(" · ") }));
    return p;
  }

  // Under `llm-sae serve --sae`, a link that opens the live view's steering panel with this feature.
  var live = null;
  function steerLink(id) {
    var a = el("a", { id: "steer-link", href: "live.html#steer=" + id, text: "Steer with this feature →", style: "display:none" });
    var show = function (j) { if (j && j.live) a.style.display = ""; };
    if (live !== null) show(live);
    else if (location.protocol === "http:" || location.protocol === "https:") {
      fetch("api/info").then(function (r) { return r.ok ? r.json() : null; }).then(function (j) { live = j || {}; show(live); }).catch(function () {});
    }
    return a;
  }

  function render(f) {
    current = f;
    document.title = "Feature " + f.id + (meta.sae_name ? " · " + meta.sae_name : "");
    LS.$("jump").value = f.id;
    LS.$("prev").disabled = f.prev === null || f.prev === undefined;
    LS.$("next").disabled = f.next === null || f.next === undefined;
    var vocab = f.vocab || [];
    var max = f.max_act > 0 ? f.max_act : 1;
    var out = document.createDocumentFragment();

    out.appendChild(el("h1", null, ["Feature " + f.id + " ", f.dead ? el("span", { cls: "badge dead", text: "dead" }) : null, f.dense ? el("span", { cls: "badge", text: "dense" }) : null]));
    var stats = el("div", { cls: "stats" });
    stats.appendChild(stat("density", LS.fmtDensity(f.density)));
    stats.appendChild(stat("max activation", LS.fmt(f.max_act, 4)));
    if (f.mean_act !== undefined && f.mean_act !== null) stats.appendChild(stat("mean act (firing)", LS.fmt(f.mean_act, 4)));
    if (f.n_fires !== undefined && f.n_fires !== null) stats.appendChild(stat("times fired", String(f.n_fires)));
    out.appendChild(stats);
    if (f.explanation) out.appendChild(explanationPanel(f.explanation));
    out.appendChild(steerLink(f.id));

    var cols = el("div", { cls: "cols" });
    var hp = el("div", { cls: "panel hist", id: "histogram" });
    hp.appendChild(el("h2", { text: "Activation histogram" }));
    if (f.hist && f.hist.counts && f.hist.counts.length) {
      var holder = el("div");
      var logBox = el("input", { type: "checkbox", id: "log-y" });
      var drawn = function () { LS.clear(holder).appendChild(LS.histogram(f.hist.edges, f.hist.counts, { logY: logBox.checked, xlabel: "activation (when firing)" })); };
      logBox.addEventListener("change", drawn);
      hp.appendChild(holder);
      hp.appendChild(el("label", { cls: "muted", style: "font-size:12px" }, [logBox, " log count"]));
      drawn();
    } else hp.appendChild(el("p", { cls: "muted", text: "This feature never fired on the analysed tokens." }));
    cols.appendChild(hp);

    var lp = el("div", { cls: "panel", id: "logits" });
    lp.appendChild(el("h2", { text: "Logit effects" }));
    var lg = f.logits;
    if (lg) {
      var two = el("div", { cls: "cols" });
      two.appendChild(el("div", null, [el("h3", { text: "Promoted" }), logitTable(lg.pos || [], "pos")]));
      two.appendChild(el("div", null, [el("h3", { text: "Suppressed" }), logitTable(lg.neg || [], "neg")]));
      lp.appendChild(two);
    } else {
      lp.appendChild(el("p", { cls: "muted", text: "Not available" + (meta.logits_reason ? ": " + meta.logits_reason : ".") }));
    }
    cols.appendChild(lp);
    out.appendChild(cols);

    var np = el("div", { cls: "panel nbrs", id: "neighbours" });
    np.appendChild(el("h2", { text: "Nearest features (decoder cosine)" }));
    var nb = f.nbrs || [];
    for (var i = 0; i < nb.length; i++) {
      np.appendChild(el("a", { href: "feature.html#" + nb[i][0], "data-id": nb[i][0] }, ["#" + nb[i][0], el("span", { cls: "cos", text: LS.fmt(nb[i][1]) })]));
    }
    if (!nb.length) np.appendChild(el("span", { cls: "muted", text: "none" }));
    out.appendChild(np);

    var tp = el("div", { cls: "panel", id: "top-examples" });
    tp.appendChild(el("h2", null, ["Top activating examples ", el("span", { cls: "scale" }, ["0", el("i"), LS.fmt(max)])]));
    var top = f.top || [];
    for (var j = 0; j < top.length; j++) tp.appendChild(exampleRow(top[j], vocab, max));
    if (!top.length) tp.appendChild(el("p", { cls: "muted", text: "No examples." }));
    out.appendChild(tp);

    var ip = el("div", { cls: "panel", id: "interval-examples" });
    ip.appendChild(el("h2", { text: "Examples by activation interval" }));
    var bins = f.intervals || [];
    for (var b = bins.length - 1; b >= 0; b--) {
      var bin = el("div", { cls: "bin" });
      bin.appendChild(el("h3", { text: "Interval " + LS.fmt(bins[b].lo) + " – " + LS.fmt(bins[b].hi) + (bins[b].count !== undefined ? "  (" + bins[b].count + " tokens)" : "") }));
      var exs = bins[b].ex || [];
      for (var e = 0; e < exs.length; e++) bin.appendChild(exampleRow(exs[e], vocab, max));
      if (!exs.length) bin.appendChild(el("p", { cls: "muted", style: "margin:2px 8px", text: bins[b].count ? "(examples not shown)" : "no activations in this interval" }));
      ip.appendChild(bin);
    }
    if (!bins.length) ip.appendChild(el("p", { cls: "muted", text: "No interval examples." }));
    out.appendChild(ip);

    LS.clear(root).appendChild(out);
    window.LLM_SAE_READY = true;
  }

  function load() {
    var id = currentId();
    window.LLM_SAE_READY = false;
    LS.hideTooltip();
    if (id === null) {
      id = meta.first_id !== undefined ? meta.first_id : 0;
      history.replaceState(null, "", "#" + id);
    }
    LS.clear(root).appendChild(el("p", { cls: "muted", text: "Loading feature " + id + "…" }));
    LS.loadFeature(id).then(function (f) {
      if (currentId() === id) { render(f); window.scrollTo(0, 0); }
    }, function () {
      var range = meta.n_features ? " This site has " + meta.n_features + " features (ids " + meta.first_id + "–" + meta.last_id + ")." : "";
      LS.showError(root, "Feature " + id + " is not in this site." + range);
      window.LLM_SAE_READY = true;
    });
  }

  LS.$("prev").addEventListener("click", function () { if (current) go(current.prev); });
  LS.$("next").addEventListener("click", function () { if (current) go(current.next); });
  LS.$("go").addEventListener("click", function () { go(parseInt(LS.$("jump").value, 10)); });
  LS.$("jump").addEventListener("keydown", function (e) { if (e.key === "Enter") go(parseInt(this.value, 10)); });
  document.addEventListener("keydown", function (e) {
    if (e.target && (e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA")) return;
    if (e.key === "ArrowLeft" && current) go(current.prev);
    if (e.key === "ArrowRight" && current) go(current.next);
  });
  window.addEventListener("hashchange", load);
  load();
})();
