// A run's curves: fetched from the console's JSON, drawn with uPlot, refreshed every 2 s while
// the page is open (only redrawn when a new step was recorded: the server answers "unchanged").
"use strict";
(() => {
  const box = document.getElementById("charts");
  const state = document.getElementById("curve-state");
  const empty = document.getElementById("no-curves");
  const url = box.dataset.curvesUrl;
  const FIRST = ["loss", "train_loss", "eval_loss", "grad_norm", "learning_rate", "tokens_per_s"];
  const HIDDEN = new Set(["step", "time", "tokens", "elapsed_s", "epoch", "loss:sum"]);
  const TITLES = {
    loss: "loss per weighted token", train_loss: "train loss", eval_loss: "eval loss",
    grad_norm: "grad norm", learning_rate: "learning rate", tokens_per_s: "tokens / s",
  };
  const charts = new Map(); // column -> uPlot
  let version = -1;

  function shown(columns) {
    const names = Object.keys(columns).filter(
      (n) => !HIDDEN.has(n) && columns[n].some((v) => v !== null));
    const first = FIRST.filter((n) => names.includes(n));
    return first.concat(names.filter((n) => !first.includes(n)).sort());
  }

  function chart(name, steps, values) {
    const holder = document.createElement("div");
    holder.className = "chart";
    holder.dataset.metric = name;
    box.appendChild(holder);
    const options = {
      title: TITLES[name] || name,
      width: 440, height: 220,
      scales: { x: { time: false } },
      series: [{ label: "step" }, { label: name, stroke: "#2563eb", width: 1.5, spanGaps: true }],
      axes: [{ label: "step" }, { size: 64 }],
      legend: { live: true },
    };
    return new uPlot(options, [steps, values], holder);
  }

  function draw(curves) {
    const columns = curves.columns;
    const steps = columns.step || [];
    empty.hidden = steps.length > 0;
    for (const name of shown(columns)) {
      const data = [steps, columns[name]];
      if (charts.has(name)) charts.get(name).setData(data);
      else charts.set(name, chart(name, steps, columns[name]));
    }
    box.dataset.points = String(curves.points);
    box.dataset.lastStep = String(steps.length ? steps[steps.length - 1] : 0);
    state.textContent = `${curves.points} steps` +
      (curves.points > steps.length ? `, ${steps.length} points drawn` : "");
    document.body.dataset.curvesDrawn = "true";
  }

  async function refresh() {
    try {
      const response = await fetch(`${url}?since=${version}`, { credentials: "same-origin" });
      if (response.status === 401) { window.location.reload(); return; }
      if (!response.ok) { state.textContent = `(refresh failed: ${response.status})`; return; }
      const curves = await response.json();
      if (!curves.unchanged) { version = curves.version; draw(curves); }
    } catch (error) {
      state.textContent = "(server unreachable; retrying)";
    }
  }

  refresh().then(() => setInterval(refresh, 2000));
})();
