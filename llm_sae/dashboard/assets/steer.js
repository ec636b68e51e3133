/* Steering panel of the live view (`llm-sae serve --sae`): choose features (typed, found by
 * explanation or token, from the token table above, or from a feature page's "steer"
 * link: live.html#steer=ID), set strengths, and compare steered with unsteered text.
 * Every string from the server or the data files reaches the page as text only. */
(function () {
  "use strict";
  var LS = window.LLM_SAE, el = LS.el;
  var idx = window.LLM_SAE_INDEX || null;
  var MAX_FEATURES = 8;
  var chosen = []; // [{id, mode, value}]

  function status(t) { LS.$("steer-status").textContent = t; }
  if (location.protocol === "file:") { LS.$("steer-run").disabled = true; return; }

  function renderChosen() {
    var tb = LS.clear(LS.$("steer-features").querySelector("tbody"));
    chosen.forEach(function (c, i) {
      var mode = el("select", { onchange: function () { c.mode = this.value; renderChosen(); } });
      ["add", "clamp", "ablate"].forEach(function (m) { mode.appendChild(el("option", { value: m, text: m, selected: m === c.mode ? "selected" : null })); });
      var val = el("input", { type: "number", step: "any", value: String(c.value), disabled: c.mode === "ablate" ? "disabled" : null,
        oninput: function () { c.value = parseFloat(this.value) || 0; } });
      var expl = idx && idx.expl && idx.expl[c.id] ? idx.expl[c.id] : "";
      tb.appendChild(el("tr", { "data-id": c.id }, [
        el("td", { cls: "num" }, [el("a", { href: "feature.html#" + c.id, text: "#" + c.id })]),
        el("td", null, [mode]),
        el("td", { cls: "num" }, [val]),
        el("td", null, [el("button", { text: "remove", onclick: function () { chosen.splice(i, 1); renderChosen(); } }), " ", el("span", { cls: "muted", text: expl })]),
      ]));
    });
  }

  LS.steerAdd = function (id) {
    id = parseInt(id, 10);
    if (isNaN(id) || id < 0) return;
    if (chosen.some(function (c) { return c.id === id; })) return;
    if (chosen.length >= MAX_FEATURES) { status("at most " + MAX_FEATURES + " features"); return; }
    chosen.push({ id: id, mode: "add", value: 8 });
    renderChosen();
  };

  // ---- search the index (explanations and top tokens) for features to add
  function search(q) {
    var box = LS.clear(LS.$("steer-suggest"));
    q = q.toLowerCase();
    if (!idx || !q) return;
    var hits = 0;
    for (var i = 0; i < idx.id.length && hits < 12; i++) {
      var text = ((idx.expl && idx.expl[i]) || "") + "\u0001" + (idx.top[i] || []).join("\u0001");
      if (text.toLowerCase().indexOf(q) === -1) continue;
      hits++;
      (function (id, label) {
        box.appendChild(el("a", { href: "#", "data-id": id, onclick: function (e) { e.preventDefault(); LS.steerAdd(id); } },
          ["#" + id + " ", el("span", { cls: "cos", text: label })]));
      })(idx.id[i], (idx.expl && idx.expl[i]) || (idx.top[i] || []).join(" "));
    }
    if (!hits) box.appendChild(el("span", { cls: "muted", text: "no feature matches" }));
  }

  function showRun(boxId, run, features) {
    var box = LS.clear(LS.$(boxId));
    var acts = (run.acts || []).map(function (row) { return row.length ? Math.max.apply(null, row) : 0; });
    var max = 0;
    acts.forEach(function (a) { max = Math.max(max, a); });
    run.tokens.forEach(function (tok, i) {
      var s = LS.tokenSpan(tok, acts.length ? acts[i] : 0, max || 1);
      if (i >= run.n_prompt) s.className += " generated";
      if (run.acts && run.acts[i]) s.setAttribute("title", features.map(function (f, j) { return "#" + f + ": " + LS.fmt(run.acts[i][j], 4); }).join("  "));
      box.appendChild(s);
    });
  }

  function steer() {
    var body = {
      prompt: LS.$("steer-prompt").value,
      features: chosen.map(function (c) { return { id: c.id, mode: c.mode, value: c.value }; }),
      max_new_tokens: parseInt(LS.$("steer-n").value, 10) || 24,
      temperature: parseFloat(LS.$("steer-temp").value) || 0,
      seed: parseInt(LS.$("steer-seed").value, 10) || 0,
    };
    status("generating…");
    window.LLM_SAE_READY = false;
    fetch("api/steer", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      .then(function (r) { return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || r.statusText); return j; }); })
      .then(function (j) {
        showRun("steered", j.steered, j.features);
        showRun("unsteered", j.unsteered, j.features);
        status(j.features.length ? "colour: strongest activation of features " + j.features.map(function (f) { return "#" + f; }).join(", ") : "no features: both are the plain model");
        window.LLM_SAE_READY = true;
      })
      .catch(function (e) { status("error: " + e.message); window.LLM_SAE_READY = true; });
  }

  var timer = null;
  LS.$("steer-search").addEventListener("input", function () { var v = this.value; clearTimeout(timer); timer = setTimeout(function () { search(v); }, 120); });
  LS.$("steer-id").addEventListener("keydown", function (e) { if (e.key === "Enter") { LS.steerAdd(this.value); this.value = ""; } });
  LS.$("steer-run").addEventListener("click", steer);
  var m = /(?:^#|&)steer=(\d+)/.exec(location.hash);
  if (m) LS.steerAdd(m[1]);
})();
