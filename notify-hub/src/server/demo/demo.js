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
  let replayUpTo = 0;

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

  let timer = null;
  // Whether the current token has ever been accepted: a socket that closes
  // before opening is a refused token only then (a browser reports a 401
  // and a server that is down the same way), so a known-good token keeps
  // retrying with backoff while the server is away.
  let accepted = false;

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(connect, retry);
    retry = Math.min(retry * 2, 10000);
  }

  function connect() {
    timer = null;
    if (!token || socket) return;
    user = subject(token);
    last = user ? Number(localStorage.getItem(lastKey(user)) || 0) : 0;
    $("last").textContent = last ? String(last) : "–";
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = scheme + "//" + location.host + "/v1/ws" + (last ? "?since=" + last : "");
    setState("connecting", "connecting…");
    let opened = false;
    let ws;
    try {
      ws = new WebSocket(url, ["notify.v1", "bearer." + token]);
    } catch (e) {
      // A token with characters a subprotocol cannot carry.
      setState("refused", "refused: not a token");
      return;
    }
    socket = ws;
    // Every handler ignores a socket that is no longer the current one.
    ws.onopen = () => {
      if (ws !== socket) return;
      opened = true;
      accepted = true;
      retry = 500;
    };
    ws.onmessage = (event) => {
      if (ws !== socket) return;
      const frame = JSON.parse(event.data);
      if (frame.type === "welcome") {
        user = frame.user_id;
        $("user").textContent = user;
        // A server that lost its history (an in-memory store restarted)
        // numbers from 1 again: follow it down, or nothing would show.
        if (frame.last_seq < last) {
          last = frame.last_seq;
          localStorage.setItem(lastKey(user), String(last));
          $("last").textContent = String(last);
        }
        setState("connected", "connected");
        // Deliveries above `last` follow: the replay first, then live ones.
        replayUpTo = frame.last_seq;
      } else if (frame.type === "notification") {
        if (frame.seq <= last) return; // already shown
        show(frame.seq, frame.notification, frame.seq > replayUpTo);
        last = frame.seq;
        localStorage.setItem(lastKey(user), String(last));
        $("last").textContent = String(last);
        ws.send(JSON.stringify({ type: "ack", seq: last }));
      } else if (frame.type === "error") {
        console.warn("notify-hub:", frame.code, frame.message);
      }
    };
    ws.onclose = (event) => {
      if (ws !== socket) return;
      socket = null;
      if (leaving) return;
      if (!opened && !accepted) {
        // Never accepted: a bad or expired token (401), or no server.
        setState("refused", "refused: check the token (or the server)");
        return;
      }
      if (event.code === 4001) {
        setState("closed", "token expired: paste a fresh one");
        return;
      }
      setState("closed", "disconnected (" + event.code + "), reconnecting…");
      schedule();
    };
  }

  // Stops the current socket and any pending reconnect.
  function disconnect() {
    clearTimeout(timer);
    timer = null;
    const ws = socket;
    socket = null;
    if (ws) ws.close(1000);
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    disconnect();
    token = $("token").value.trim();
    accepted = false;
    retry = 500;
    sessionStorage.setItem("notify-demo:token", token);
    list.replaceChildren();
    connect();
  });

  // Leaving the page closes the socket at once (a page kept in the
  // back/forward cache would otherwise keep it open), and coming back to a
  // cached page connects again from the last seq shown.
  let leaving = false;
  window.addEventListener("pagehide", () => {
    leaving = true;
    disconnect();
  });
  window.addEventListener("pageshow", (event) => {
    leaving = false;
    if (event.persisted) connect();
  });

  const fromFragment = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromFragment) {
    // Kept for this tab only, and out of the address bar and the history.
    history.replaceState(null, "", location.pathname + location.search);
  }
  token = fromFragment || sessionStorage.getItem("notify-demo:token");
  if (token) {
    sessionStorage.setItem("notify-demo:token", token);
    $("token").value = token;
    connect();
  }
})();
