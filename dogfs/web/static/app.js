// DogFS dashboard: renders the live feed of a metadata node (/ws). Plain JavaScript, no
// libraries, no build step. Every node is an element with data-node-id and data-state, so
// that tests and scripts can read the page. Messages are described in docs/dashboard.md.
(function () {
  "use strict";

  var SECTIONS = ["node", "cluster", "meta", "chunks", "namespace"];
  var MAX_EVENTS = 200;
  var BACKOFF_MIN_MS = 500;
  var BACKOFF_MAX_MS = 5000;
  // After failing to reach the leader from a follower's page, stay on the follower this long.
  var LEADER_RETRY_MS = 15000;

  var model = { status: null, points: [], windowS: 300, events: [], lastMessageAt: 0 };
  var conn = {
    ws: null, target: location.host, home: location.host, attempt: 0, timer: null,
    leaderFailedAt: 0, opened: false, tried: {}
  };
  window.dogfsDashboard = { model: model, conn: conn };

  function $(id) { return document.getElementById(id); }

  // ---- formatting ---------------------------------------------------------------------

  function fmtBytes(n) {
    if (n === null || n === undefined || isNaN(n)) { return "–"; }
    var units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    var i = 0;
    n = Number(n);
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + " " + units[i];
  }
  function fmtRate(n) { return fmtBytes(n) + "/s"; }
  function fmtInt(n) { return (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US"); }
  function fmtAge(s) {
    if (s === null || s === undefined) { return "never"; }
    s = Number(s);
    if (s < 60) { return s.toFixed(1) + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s"; }
    return (s / 3600).toFixed(1) + " h";
  }
  function fmtClock(t) {
    var d = new Date(t * 1000);
    function two(x) { return (x < 10 ? "0" : "") + x; }
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }
  function text(el, value) { if (el && el.textContent !== String(value)) { el.textContent = value; } }
  function attr(el, name, value) {
    if (value === null || value === undefined) { el.removeAttribute(name); return; }
    if (el.getAttribute(name) !== String(value)) { el.setAttribute(name, value); }
  }
  function wsUrl(hostport) { return (location.protocol === "https:" ? "wss://" : "ws://") + hostport + "/ws"; }
  function pageUrl(hostport) { return location.protocol + "//" + hostport + "/"; }

  // ---- rows that update in place --------------------------------------------------------

  function syncRows(tbody, items, build, update) {
    var existing = {};
    Array.prototype.forEach.call(tbody.children, function (tr) { existing[tr.dataset.nodeId] = tr; });
    items.forEach(function (item, index) {
      var tr = existing[item.id];
      if (!tr) {
        tr = build(item);
        tr.setAttribute("data-node-id", item.id);
      }
      delete existing[item.id];
      update(tr, item);
      if (tbody.children[index] !== tr) { tbody.insertBefore(tr, tbody.children[index] || null); }
    });
    Object.keys(existing).forEach(function (id) { tbody.removeChild(existing[id]); });
  }

  function makeRow(kind, columns) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-kind", kind);
    columns.forEach(function (name) {
      var td = document.createElement("td");
      td.className = "c-" + name;
      tr.appendChild(td);
    });
    return tr;
  }
  function cell(tr, name) { return tr.querySelector(".c-" + name); }

  function setStateCell(td, state) {
    var span = td.firstChild;
    if (!span) { span = document.createElement("span"); span.className = "state"; td.appendChild(span); }
    attr(span, "data-state", state);
    text(span, state);
  }

  var META_COLUMNS = ["id", "state", "role", "term", "commit", "applied", "contact", "address", "link"];
  function updateMetaRow(tr, m) {
    var leader = model.status && model.status.cluster && model.status.cluster.leader;
    var role = m.role || "unknown";
    var isLeader = m.id === leader || role === "leader";
    attr(tr, "data-state", m.state);
    attr(tr, "data-role", isLeader ? "leader" : role);
    var idCell = cell(tr, "id");
    var me = model.status && model.status.node && model.status.node.id === m.id;
    var wanted = m.id + (me ? " (this page)" : "");
    if (idCell.dataset.text !== wanted + isLeader) {
      idCell.textContent = m.id;
      if (isLeader) {
        var badge = document.createElement("span");
        badge.className = "badge-leader";
        badge.textContent = "leader";
        idCell.appendChild(badge);
      }
      if (me) {
        var here = document.createElement("span");
        here.className = "muted small";
        here.textContent = " · this feed";
        idCell.appendChild(here);
      }
      idCell.dataset.text = wanted + isLeader;
    }
    setStateCell(cell(tr, "state"), m.state);
    text(cell(tr, "role"), role);
    text(cell(tr, "term"), fmtInt(m.term));
    text(cell(tr, "commit"), fmtInt(m.commit_index));
    text(cell(tr, "applied"), fmtInt(m.applied_index));
    text(cell(tr, "contact"), me ? "–" : fmtAge(m.last_contact_s));
    text(cell(tr, "address"), m.address || "–");
    var linkCell = cell(tr, "link");
    if (m.http_address) {
      var a = linkCell.firstChild;
      if (!a) { a = document.createElement("a"); linkCell.appendChild(a); }
      attr(a, "href", pageUrl(m.http_address));
      text(a, m.http_address);
    } else {
      text(linkCell, "–");
    }
  }

  var CHUNK_COLUMNS = ["id", "state", "usage", "shards", "heartbeat", "load", "domain", "address"];
  function updateChunkRow(tr, c) {
    attr(tr, "data-state", c.state);
    text(cell(tr, "id"), c.id);
    setStateCell(cell(tr, "state"), c.state);
    var usage = cell(tr, "usage");
    if (!usage.firstChild) {
      usage.innerHTML = '<span class="bar"><span></span></span><span class="usage-text"></span>';
    }
    var cap = Number(c.capacity_bytes) || 0;
    var used = Number(c.used_bytes) || 0;
    var frac = cap > 0 ? Math.min(1, used / cap) : 0;
    var bar = usage.querySelector(".bar");
    attr(bar, "data-level", frac > 0.95 ? "full" : frac > 0.8 ? "high" : "ok");
    bar.firstChild.style.width = (frac * 100).toFixed(1) + "%";
    text(usage.querySelector(".usage-text"),
      fmtBytes(used) + " / " + fmtBytes(cap) + (cap > 0 ? " (" + (frac * 100).toFixed(0) + "%)" : ""));
    text(cell(tr, "shards"), fmtInt(c.shards));
    var hb = cell(tr, "heartbeat");
    text(hb, fmtAge(c.last_heartbeat_s));
    hb.classList.toggle("age-old", c.state === "dead");
    var load = c.load || {};
    var put = load.put_bytes_s, get = load.get_bytes_s;
    // A dead server's last reported load is history, not load.
    var noLoad = c.state !== "running" || (put === undefined && get === undefined);
    text(cell(tr, "load"), noLoad ? "–" : fmtRate(put || 0) + " / " + fmtRate(get || 0));
    text(cell(tr, "domain"), c.domain || "–");
    text(cell(tr, "address"), c.address || "–");
  }

  // ---- sections -----------------------------------------------------------------------

  function renderNodes() {
    var s = model.status;
    syncRows($("meta-rows"), s.meta || [], function () { return makeRow("meta", META_COLUMNS); }, updateMetaRow);
    syncRows($("chunk-rows"), s.chunks || [], function () { return makeRow("chunk", CHUNK_COLUMNS); }, updateChunkRow);
  }

  function countUp(list) {
    return (list || []).filter(function (n) { return n.state === "running"; }).length;
  }

  function renderSummary() {
    var s = model.status;
    var cluster = s.cluster || {};
    var ns = s.namespace || {};
    text($("tile-leader"), cluster.leader || "none");
    $("tile-leader").parentNode.dataset.health = cluster.leader ? "ok" : "bad";
    var metaUp = countUp(s.meta), metaAll = (s.meta || []).length;
    text($("tile-meta"), metaUp + " / " + metaAll);
    $("tile-meta").parentNode.dataset.health = metaUp * 2 > metaAll ? (metaUp === metaAll ? "ok" : "") : "bad";
    var chunkUp = countUp(s.chunks), chunkAll = (s.chunks || []).length;
    text($("tile-chunks"), chunkUp + " / " + chunkAll);
    $("tile-chunks").parentNode.dataset.health = chunkUp === chunkAll ? "ok" : "bad";
    text($("tile-files"), fmtInt(ns.files));
    text($("tile-bytes"), fmtBytes(ns.bytes) + " / " + fmtBytes(ns.bytes_on_disk));
    var risk = ns.at_risk || {};
    var critical = 0;
    Object.keys(risk).forEach(function (k) { if (Number(k) <= 0) { critical += Number(risk[k]) || 0; } });
    text($("tile-risk"), fmtInt(critical));
    $("tile-risk-box").dataset.health = critical > 0 ? "bad" : "ok";
    text($("cluster-ec"), cluster.default_ec ? "default " + cluster.default_ec : "");
    text($("ns-files"), fmtInt(ns.files));
    text($("ns-dirs"), fmtInt(ns.dirs));
    text($("ns-bytes"), fmtBytes(ns.bytes));
    text($("ns-disk"), fmtBytes(ns.bytes_on_disk));
    text($("ns-overhead"), ns.bytes > 0 ? (ns.bytes_on_disk / ns.bytes).toFixed(2) + "×" : "–");
    text($("ns-groups"), fmtInt(ns.block_groups));
    text($("ns-ec"), cluster.default_ec || "–");
    var node = s.node || {};
    text($("via"), "via " + (node.id || "?") + " at " + conn.target + (node.is_leader ? " (leader)" : " (follower)"));
    document.title = "DogFS: " + chunkUp + "/" + chunkAll + " chunk servers up" +
      (critical > 0 ? ", " + critical + " block groups at risk" : "");
  }

  function renderRisk() {
    var risk = (model.status.namespace || {}).at_risk || {};
    var levels = Object.keys(risk).sort(function (a, b) { return Number(a) - Number(b); });
    var max = 1;
    levels.forEach(function (k) { max = Math.max(max, Number(risk[k]) || 0); });
    var chart = $("risk-chart");
    var existing = {};
    Array.prototype.forEach.call(chart.children, function (col) { existing[col.dataset.level] = col; });
    levels.forEach(function (k, index) {
      var col = existing[k];
      if (!col) {
        col = document.createElement("div");
        col.className = "risk-col";
        col.setAttribute("data-level", k);
        if (Number(k) < 0) { col.setAttribute("data-lost", "true"); }
        col.innerHTML = '<span class="risk-count"></span><div class="risk-bar"></div><span class="risk-label"></span>';
      }
      delete existing[k];
      var n = Number(risk[k]) || 0;
      text(col.querySelector(".risk-count"), fmtInt(n));
      // A few block groups near loss must stay visible beside thousands of healthy ones.
      var height = n > 0 ? Math.max(4, n / max * 75) : 0;
      col.querySelector(".risk-bar").style.height = height.toFixed(1) + "%";
      text(col.querySelector(".risk-label"), Number(k) < 0 ? "lost" :
        Number(k) === 0 ? "0 more (critical)" : k + " more");
      if (chart.children[index] !== col) { chart.insertBefore(col, chart.children[index] || null); }
    });
    Object.keys(existing).forEach(function (k) { chart.removeChild(existing[k]); });
  }

  function renderEvents() {
    var list = $("events");
    var have = {};
    Array.prototype.forEach.call(list.children, function (li) { have[li.dataset.seq] = true; });
    model.events.forEach(function (ev) {
      if (have[ev.seq]) { return; }
      var li = document.createElement("li");
      li.setAttribute("data-seq", ev.seq);
      li.setAttribute("data-level", ev.level || "info");
      li.setAttribute("data-kind", ev.kind || "event");
      var time = document.createElement("time");
      time.textContent = fmtClock(ev.t || 0);
      li.appendChild(time);
      li.appendChild(document.createTextNode(ev.message || ev.kind));
      list.insertBefore(li, list.firstChild);
    });
    while (list.children.length > MAX_EVENTS) { list.removeChild(list.lastChild); }
  }

  function renderBanner() {
    var banner = $("banner");
    var node = model.status && model.status.node;
    var message = null, kind = null, link = null;
    if (!conn.opened) {
      kind = "lost";
      message = model.status
        ? "Connection to " + (conn.lostFrom || conn.home) + " lost; trying " + conn.target +
          "… (the view below is stale)"
        : "Cannot reach " + conn.target + " yet; retrying…";
    } else if (node && node.stale) {
      kind = "stale";
      message = node.id + " is a follower: its view of chunk servers may be stale. ";
      if (node.leader_http_address) {
        link = { href: pageUrl(node.leader_http_address), label: "Open the leader (" + (node.leader || node.leader_http_address) + ")" };
      } else {
        message += "No leader is known.";
      }
    }
    document.body.dataset.stale = (kind !== null) ? "true" : "false";
    if (kind === null) { banner.hidden = true; attr(banner, "data-kind", null); return; }
    banner.hidden = false;
    attr(banner, "data-kind", kind);
    var key = message + (link ? link.href : "");
    if (banner.dataset.key !== key) {
      banner.textContent = message;
      if (link) {
        var a = document.createElement("a");
        a.href = link.href;
        a.textContent = link.label;
        banner.appendChild(a);
      }
      banner.dataset.key = key;
    }
  }

  // ---- throughput chart, drawn by hand --------------------------------------------------

  // A round axis maximum in the unit the value is shown in (B, KiB, MiB, ... per second).
  function niceMax(v) {
    if (v <= 0) { return 1024; }
    var unit = 1;
    while (v / unit >= 1024) { unit *= 1024; }
    var x = v / unit;
    var p = Math.pow(10, Math.floor(Math.log10(x)));
    var steps = [1, 2, 4, 5, 8, 10];
    for (var i = 0; i < steps.length; i++) { if (steps[i] * p >= x) { return steps[i] * p * unit; } }
    return 10 * p * unit;
  }

  function drawChart() {
    var canvas = $("throughput-chart");
    var ratio = window.devicePixelRatio || 1;
    var w = canvas.clientWidth, h = canvas.clientHeight;
    if (w === 0 || h === 0) { return; }
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var left = 74, right = 22, top = 8, bottom = 20;
    var pw = w - left - right, ph = h - top - bottom;
    var pts = model.points;
    var now = pts.length ? pts[pts.length - 1].t : 0;
    var t0 = now - model.windowS;
    var maxV = 0;
    pts.forEach(function (p) { maxV = Math.max(maxV, p.put_bytes_s || 0, p.get_bytes_s || 0); });
    var ymax = niceMax(maxV);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7280";
    ctx.strokeStyle = "#e3e6eb";
    ctx.lineWidth = 1;
    for (var i = 0; i <= 4; i++) {
      var y = top + ph - ph * i / 4;
      ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(left + pw, y + 0.5); ctx.stroke();
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      ctx.fillText(fmtRate(ymax * i / 4), left - 6, y);
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (var m = 0; m <= model.windowS; m += 60) {
      var x = left + pw - pw * m / model.windowS;
      // The end labels stay inside the plot: the oldest starts at the axis, "now" ends at the edge.
      ctx.textAlign = m === 0 ? "right" : m === model.windowS ? "left" : "center";
      ctx.fillText(m === 0 ? "now" : "-" + (m / 60) + " min", m === 0 ? x + right : x, top + ph + 4);
    }
    function line(key, colour) {
      ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.beginPath();
      var started = false;
      pts.forEach(function (p) {
        if (p.t < t0) { return; }
        var x = left + pw * (p.t - t0) / model.windowS;
        var y = top + ph - ph * Math.min(1, (p[key] || 0) / ymax);
        if (started) { ctx.lineTo(x, y); } else { ctx.moveTo(x, y); started = true; }
      });
      ctx.stroke();
    }
    var style = getComputedStyle(document.documentElement);
    line("put_bytes_s", style.getPropertyValue("--put").trim() || "#2f6fdb");
    line("get_bytes_s", style.getPropertyValue("--get").trim() || "#17a589");
    var last = pts.length ? pts[pts.length - 1] : {};
    text($("put-now"), fmtRate(last.put_bytes_s || 0) + ", " + (last.put_ops_s || 0).toFixed(1) + " ops/s");
    text($("get-now"), fmtRate(last.get_bytes_s || 0) + ", " + (last.get_ops_s || 0).toFixed(1) + " ops/s");
    text($("throughput-window"), "last " + Math.round(model.windowS / 60) + " min");
  }

  function addPoints(points) {
    var lastT = model.points.length ? model.points[model.points.length - 1].t : -Infinity;
    (points || []).forEach(function (p) { if (p.t > lastT) { model.points.push(p); lastT = p.t; } });
    var cutoff = lastT - model.windowS;
    while (model.points.length && model.points[0].t < cutoff) { model.points.shift(); }
  }

  function renderAll() {
    if (!model.status) { renderBanner(); return; }
    renderNodes();
    renderSummary();
    renderRisk();
    renderEvents();
    renderBanner();
    drawChart();
  }

  // ---- the feed -----------------------------------------------------------------------

  function onMessage(event) {
    var msg;
    try { msg = JSON.parse(event.data); } catch (e) { return; }
    model.lastMessageAt = Date.now();
    if (msg.type === "snapshot") {
      model.status = {};
      SECTIONS.forEach(function (k) { model.status[k] = msg[k]; });
      Object.keys(msg).forEach(function (k) {
        if (["type", "seq", "time", "throughput", "events"].indexOf(k) < 0) { model.status[k] = msg[k]; }
      });
      model.windowS = (msg.throughput && msg.throughput.window_s) || model.windowS;
      model.points = [];
      addPoints(msg.throughput && msg.throughput.points);
      model.events = (msg.events || []).slice(-MAX_EVENTS);
      $("events").innerHTML = "";
      followLeader();
    } else if (msg.type === "delta") {
      if (!model.status) { return; }
      Object.keys(msg).forEach(function (k) {
        if (["type", "seq", "time", "throughput_points"].indexOf(k) < 0) { model.status[k] = msg[k]; }
      });
      addPoints(msg.throughput_points);
      if (msg.node) { followLeader(); }
    } else if (msg.type === "event") {
      model.events.push(msg.event);
      if (model.events.length > MAX_EVENTS) { model.events.shift(); }
    }
    renderAll();
  }

  // A follower's page shows the leader's view when the leader's feed can be reached: it opens
  // the leader's feed beside its own and swaps only once that one is open.
  function followLeader() {
    var node = model.status && model.status.node;
    if (!node || node.is_leader || !node.leader_http_address) { return; }
    var target = node.leader_http_address;
    if (target === conn.target || conn.probe) { return; }
    if (Date.now() - conn.leaderFailedAt < LEADER_RETRY_MS) { return; }
    var probe;
    try { probe = new WebSocket(wsUrl(target)); } catch (e) { conn.leaderFailedAt = Date.now(); return; }
    conn.probe = probe;
    probe.onopen = function () {
      if (conn.probe !== probe) { probe.close(); return; }
      conn.probe = null;
      var old = conn.ws;
      conn.target = target;
      wire(probe);
      conn.opened = true;
      conn.attempt = 0;
      setConn("open");
      if (old) { old.onclose = null; old.close(); }
    };
    probe.onclose = function () {
      if (conn.probe === probe) { conn.probe = null; conn.leaderFailedAt = Date.now(); }
    };
  }

  function candidates() {
    var list = [conn.home];
    var meta = (model.status && model.status.meta) || [];
    meta.forEach(function (m) {
      if (m.http_address && list.indexOf(m.http_address) < 0) { list.push(m.http_address); }
    });
    return list;
  }

  function scheduleReconnect() {
    if (conn.timer) { return; }
    var list = candidates();
    // Try our own node first, then the others in turn, backing off as failures add up.
    var index = list.indexOf(conn.target);
    var next = list[(index + 1) % list.length] || conn.home;
    var delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, Math.floor(conn.attempt / list.length)));
    conn.attempt += 1;
    conn.timer = setTimeout(function () { conn.timer = null; conn.target = next; connect(); }, delay);
  }

  function setConn(state) {
    var pill = $("conn");
    attr(pill, "data-conn", state);
    attr(document.body, "data-conn", state);
    text(pill, state === "open" ? "live" : state);
  }

  function wire(ws) {
    conn.ws = ws;
    ws.onmessage = onMessage;
    ws.onclose = function () {
      if (conn.ws !== ws) { return; }
      if (conn.opened) { conn.lostFrom = conn.target; }
      conn.ws = null;
      conn.opened = false;
      setConn("lost");
      renderBanner();
      scheduleReconnect();
    };
    ws.onerror = function () { /* onclose follows and reconnects */ };
  }

  function connect() {
    var ws;
    try { ws = new WebSocket(wsUrl(conn.target)); } catch (e) { scheduleReconnect(); return; }
    wire(ws);
    setConn(conn.opened ? "open" : "connecting");
    renderBanner();
    ws.onopen = function () {
      conn.opened = true;
      conn.attempt = 0;
      setConn("open");
      renderBanner();
    };
  }

  window.addEventListener("resize", function () { if (model.status) { drawChart(); } });
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", connect);
  } else {
    connect();
  }
})();
