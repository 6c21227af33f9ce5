// The playground: one sample, each token coloured by its probability (green likely, red not).
"use strict";
(() => {
  const form = document.getElementById("sample-form");
  const output = document.getElementById("output");
  const state = document.getElementById("sample-state");
  const root = document.body.dataset.root;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  function colour(logprob) {
    if (logprob === null) return "#e5e7eb";
    const p = Math.exp(Math.max(logprob, -30));
    return `hsl(${Math.round(120 * p)}, 75%, 82%)`;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = new FormData(form);
    const body = {
      model: fields.get("model"),
      mode: fields.get("mode"),
      prompt: fields.get("prompt"),
      temperature: Number(fields.get("temperature")),
      top_p: Number(fields.get("top_p")),
      max_tokens: Number(fields.get("max_tokens")),
    };
    if (fields.get("seed") !== "") body.seed = Number(fields.get("seed"));
    state.textContent = "sampling…";
    output.replaceChildren();
    const response = await fetch(`${root}/api/playground/sample`, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (!response.ok) { state.textContent = `error: ${answer.error}`; return; }
    for (const token of answer.tokens) {
      const span = document.createElement("span");
      span.className = "tok";
      span.textContent = token.text;
      span.style.background = colour(token.logprob);
      span.dataset.logprob = String(token.logprob);
      span.title = token.logprob === null ? `token ${token.id}` :
        `token ${token.id}: logprob ${token.logprob.toFixed(3)}, p ${Math.exp(token.logprob).toFixed(3)}`;
      output.appendChild(span);
    }
    output.dataset.tokens = String(answer.tokens.length);
    state.textContent = `${answer.tokens.length} tokens (${answer.stop_reason}) ` +
      `in ${answer.seconds.toFixed(2)} s from a ${answer.prompt_tokens}-token prompt`;
  });
})();
