/* Live view (only under `llm-sae serve --sae DIR --model MODEL`): encode any text with
 * the SAE and show which features fire on each token. */
(function () {
  "use strict";
  var LS = window.LLM_SAE, el = LS.el;
  LS.header("live");
  var last = null, selected = 0;

  function status(t) { LS.$("status").textContent = t; }

  function unavailable(why) {
    var u = LS.$("live-unavailable");
    u.textContent = why + " Run `llm-sae serve SITE --sae DIR --model MODEL` and open the address it prints.";
    u.style.display = "";
    LS.$("run").disabled = true;
    window.LLM_SAE_READY = true;
  }
  if (location.protocol === "file:") { unavailable("The live view needs the local server."); return; }

  function run() {
    var body = { text: LS.$("text").value, k: parseInt(LS.$("k").value, 10) || 5 };
    var f = LS.$("feature").value;
    if (f !== "") body.feature = parseInt(f, 10);
    status("encoding…");
    window.LLM_SAE_READY = false;
    fetch("api/encode", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      .then(function (r) { return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || r.statusText); return j; }); })
      .then(function (j) { last = j; selected = Math.min(selected, Math.max(0, j.tokens.length - 1)); render(); status(j.tokens.length + " tokens"); window.LLM_SAE_READY = true; })
      .catch(function (e) { status("error: " + e.message); window.LLM_SAE_READY = true; });
  }

  function render() {
    var j = last, box = LS.clear(LS.$("tokens"));
    if (!j) return;
    var acts, max = 0, title;
    if (j.feature !== null && j.feature !== undefined) {
      acts = j.acts; title = "Activation of feature " + j.feature + " on each token";
    } else {
      acts = j.top.map(function (t) { return t.length ? t[0][1] : 0; });
      title = "Strongest feature activation on each token (click a token)";
    }
    for (var i = 0; i < acts.length; i++) max = Math.max(max, acts[i]);
    LS.$("tokens-title").textContent = title;
    j.tokens.forEach(function (tok, i) {
      var s = LS.tokenSpan(tok, acts[i], max || 1);
      s.setAttribute("data-i", i);
      if (i === selected) s.className += " sel";
      s.addEventListener("click", function () { selected = i; render(); });
      box.appendChild(s);
    });
    var tb = LS.clear(LS.$("token-features").querySelector("tbody"));
    var tok = j.tokens[selected];
    LS.$("token-features-title").textContent = "";
    LS.$("token-features-title").appendChild(document.createTextNode("Features on token " + selected + " "));
    if (tok !== undefined) LS.$("token-features-title").appendChild(LS.chip(tok));
    (j.top[selected] || []).forEach(function (pair) {
      var show = el("button", { text: "show on text", onclick: function () { LS.$("feature").value = pair[0]; run(); } });
      var add = function () { if (LS.steerAdd) LS.steerAdd(pair[0]); };
      var steer = el("span", { cls: "steer-add", role: "button", tabindex: "0", text: "steer with it", onclick: add,
        onkeydown: function (e) { if (e.key === "Enter") add(); } });
      tb.appendChild(el("tr", null, [
        el("td", { cls: "num" }, [el("a", { href: "feature.html#" + pair[0], text: "#" + pair[0] })]),
        el("td", { cls: "num", text: LS.fmt(pair[1], 4) }),
        el("td", null, [show, " ", steer]),
      ]));
    });
  }

  LS.$("run").disabled = true;
  fetch("api/info").then(function (r) { return r.json(); }).then(function (j) {
    if (!j.live) { unavailable("This server was started without an SAE."); return; }
    LS.$("run").disabled = false;
    var m = j.model ? "model " + j.model + ", hook " + j.hook + ", " + j.n_latents + " features" : "";
    status(m);
    window.LLM_SAE_READY = true;
  }, function () { unavailable("The server did not answer."); });
  LS.$("run").addEventListener("click", run);
  LS.$("text").addEventListener("keydown", function (e) { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
  LS.$("feature").addEventListener("keydown", function (e) { if (e.key === "Enter") run(); });
})();
