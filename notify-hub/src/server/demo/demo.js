// notify-hub browser demo: protocol notify.v1 with the browser's own
// WebSocket. The token travels as a subprotocol entry ("bearer.<jwt>"),
// the only way a browser can send one on the upgrade; the last seq shown
// is kept in localStorage, per user, and sent as ?since= on every connect,
// so a reload (or a dropped connection) resumes exactly after it.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const list = $("notifications");
  let socket = null;
  let token = null;
  let user = null;
  let last = 0;
  let retry = 500;

  const lastKey = (u) => "notify-demo:last:" + u;
  const setState = (state, text) => {
    document.body.dataset.state = state;
    $("state").textContent = text;
  };

  // The user id is the token's `sub`: read without verifying (the server
  // verifies), only to find this user's saved position before connecting.
  function subject(jwt) {
    try {
      const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part)).sub || null;
    } catch (e) {
      return null;
    }
  }

  function show(seq, n, live) {
    const item = document.createElement("li");
    item.dataset.seq = String(seq);
    if (!live) item.className = "replayed";
    const title = document.createElement("strong");
    title.textContent = n.title;
    const body = document.createElement("div");
    body.textContent = n.message;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = "#" + seq + " · " + n.type + " · " + n.timestamp + (live ? "" : " · replayed");
    item.append(title, body, meta);
    list.prepend(item);
  }

  function connect() {
    if (!token) return;
    user = subject(token);
    last = user ? Number(localStorage.getItem(lastKey(user)) || 0) : 0;
    $("last").textContent = last ? String(last) : "–";
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = scheme + "//" + location.host + "/v1/ws" + (last ? "?since=" + last : "");
    setState("connecting", "connecting…");
    let opened = false;
    socket = new WebSocket(url, ["notify.v1", "bearer." + token]);
    socket.onopen = () => { opened = true; retry = 500; };
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "welcome") {
        user = frame.user_id;
        $("user").textContent = user;
        setState("connected", "connected");
        // Deliveries above `last` follow: the replay first, then live ones.
        window.__replayUpTo = frame.last_seq;
      } else if (frame.type === "notification") {
        if (frame.seq <= last) return; // already shown
        show(frame.seq, frame.notification, frame.seq > (window.__replayUpTo || 0));
        last = frame.seq;
        localStorage.setItem(lastKey(user), String(last));
        $("last").textContent = String(last);
        socket.send(JSON.stringify({ type: "ack", seq: last }));
      } else if (frame.type === "error") {
        console.warn("notify-hub:", frame.code, frame.message);
      }
    };
    socket.onclose = (event) => {
      socket = null;
      if (leaving) return;
      if (!opened) {
        // Refused before the upgrade (401: bad or expired token).
        setState("refused", "refused: check the token");
        return;
      }
      if (event.code === 4001) {
        setState("closed", "token expired: paste a fresh one");
        return;
      }
      setState("closed", "disconnected (" + event.code + "), reconnecting…");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 10000);
    };
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("notify-demo:token", token);
    if (socket) socket.close(1000);
    list.replaceChildren();
    connect();
  });

  // Leaving the page closes the socket at once (a page kept in the
  // back/forward cache would otherwise keep it open), and coming back to a
  // cached page connects again from the last seq shown.
  let leaving = false;
  window.addEventListener("pagehide", () => {
    leaving = true;
    if (socket) socket.close(1000);
  });
  window.addEventListener("pageshow", (event) => {
    leaving = false;
    if (event.persisted && !socket) connect();
  });

  const fromFragment = new URLSearchParams(location.hash.slice(1)).get("token");
  token = fromFragment || sessionStorage.getItem("notify-demo:token");
  if (token) {
    sessionStorage.setItem("notify-demo:token", token);
    $("token").value = token;
    connect();
  }
})();
