// ohd dashboard: live updates of the overview (polls /api/status every 2 s: the queue, running
// tasks), of every part of a page marked data-live (the model table and the charts, a task page's
// facts, executions, validation, report, output and calls: the page itself is fetched again every
// 3 s and each such part whose markup changed is swapped for its fresh copy, so one renderer, the
// server's, draws them), and the task page's cancel and retry buttons. The pages read without it;
// it only adds. The token comes from the page's <meta name="ohd-token">: the listener refuses a
// change that carries the cookie alone.
"use strict";

(function () {
  var POLL_MS = 2000;
  var LIVE_MS = 3000;
  var meta = document.querySelector('meta[name="ohd-token"]');
  var token = meta ? meta.getAttribute("content") : "";

  function duration(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    function two(n) { return (n < 10 ? "0" : "") + n; }
    if (s >= 3600) return Math.floor(s / 3600) + "h" + two(Math.floor((s % 3600) / 60)) + "m";
    if (s >= 60) return Math.floor(s / 60) + "m" + two(s % 60) + "s";
    return s + "s";
  }

  function cell(row, content) {
    var td = document.createElement("td");
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    row.appendChild(td);
    return td;
  }

  function showStatus(status) {
    var queue = status.queue || {};
    document.querySelectorAll("[data-queue]").forEach(function (el) {
      el.textContent = String(queue[el.getAttribute("data-queue")] || 0);
    });
    var workers = status.workers || {};
    var w = document.getElementById("workers");
    if (w) w.textContent = (workers.busy || 0) + "/" + (workers.size || 0);
    var up = document.getElementById("uptime");
    if (up && status.uptime_s != null) up.textContent = duration(status.uptime_s);
    var body = document.querySelector("#running tbody");
    if (body) {
      var now = Date.parse(status.now);
      body.textContent = "";
      (status.running || []).forEach(function (task) {
        var row = document.createElement("tr");
        var link = document.createElement("a");
        link.href = "/tasks/" + task.id;
        link.textContent = "#" + task.id;
        cell(row, link);
        cell(row, task.type);
        cell(row, task.target);
        var started = Date.parse(task.started_at);
        cell(row, isNaN(started) || isNaN(now) ? "-" : duration((now - started) / 1000));
        body.appendChild(row);
      });
      if (!body.children.length) {
        var empty = document.createElement("tr");
        empty.className = "empty";
        cell(empty, "nothing running").colSpan = 4;
        body.appendChild(empty);
      }
    }
    var live = document.getElementById("live");
    if (live) live.textContent = "(live, updated " + new Date().toLocaleTimeString() + ")";
  }

  function poll() {
    fetch("/api/status", { headers: { Authorization: "Bearer " + token }, cache: "no-store" })
      .then(function (answer) {
        if (!answer.ok) throw new Error("status " + answer.status);
        return answer.json();
      })
      .then(showStatus)
      .catch(function (error) {
        var live = document.getElementById("live");
        if (live) live.textContent = "(live updates stopped: " + error.message + "; retrying)";
      })
      .finally(function () { setTimeout(poll, POLL_MS); });
  }

  // Swap each [data-live] part for its copy in a fresh fetch of this page; the <details> a reader
  // opened stay open. Resolves once done (or failed: the next round tries again).
  function refreshLive() {
    return fetch(window.location.href, { headers: { Authorization: "Bearer " + token }, cache: "no-store" })
      .then(function (answer) {
        if (!answer.ok) throw new Error("status " + answer.status);
        return answer.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live][id]").forEach(function (old) {
          var next = fresh.getElementById(old.id);
          if (!next || next.innerHTML === old.innerHTML) return;
          var open = [];
          old.querySelectorAll("details").forEach(function (d, i) { if (d.open) open.push(i); });
          var details = next.querySelectorAll("details");
          open.forEach(function (i) { if (details[i]) details[i].open = true; });
          old.replaceWith(document.importNode(next, true));
        });
        document.body.setAttribute("data-live-at", new Date().toISOString());
      })
      .catch(function () {});
  }

  function liveLoop() {
    refreshLive().finally(function () { setTimeout(liveLoop, LIVE_MS); });
  }

  function act(button) {
    var note = document.getElementById("action-note");
    var id = button.getAttribute("data-task"), action = button.getAttribute("data-action");
    button.disabled = true;
    fetch("/api/tasks/" + id + "/" + action, { method: "POST", headers: { Authorization: "Bearer " + token } })
      .then(function (answer) {
        return answer.json().then(function (data) { return { ok: answer.ok, data: data }; });
      })
      .then(function (result) {
        button.disabled = false;
        if (result.ok) { note.textContent = action + ": done"; return refreshLive(); }
        note.textContent = action + " refused: " + (result.data.error || "error");
      })
      .catch(function (error) {
        note.textContent = action + " failed: " + error.message;
        button.disabled = false;
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.getElementById("queue")) poll();
    if (document.querySelector("[data-live][id]")) setTimeout(liveLoop, LIVE_MS);
    var note = document.getElementById("action-note");
    if (note) note.textContent = "";
    document.querySelectorAll("button[data-action]").forEach(function (button) {
      button.disabled = false;
      button.addEventListener("click", function () { act(button); });
    });
  });
})();
