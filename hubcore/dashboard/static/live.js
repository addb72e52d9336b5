// The live page refreshes itself: every data-interval seconds one GET of
// its data-source (the same server-rendered tables as the page), patched
// into the page node by node. What did not change stays the very same DOM
// node, so a button under the pointer is not swapped away mid-click and
// the page does not flicker. Without this script the page is whole and
// has a refresh link. A background tab does not poll.
(function () {
  "use strict";

  var root = document.getElementById("live");
  if (!root || !window.fetch || !window.DOMParser) {
    return;
  }
  var source = root.getAttribute("data-source");
  var seconds = Number(root.getAttribute("data-interval")) || 2;
  var note = document.getElementById("live-auto");
  var timer = 0;
  var busy = false;
  var stopped = false;

  function say(text) {
    if (note) {
      note.textContent = text;
    }
  }

  function imported(node) {
    return document.importNode(node, true);
  }

  // Make `old` (in the page) look like `next` (parsed), touching only what differs.
  function morph(old, next) {
    if (old.isEqualNode(next)) {
      return;
    }
    if (old.nodeType === Node.TEXT_NODE && next.nodeType === Node.TEXT_NODE) {
      old.nodeValue = next.nodeValue;
      return;
    }
    if (old.nodeType !== Node.ELEMENT_NODE || next.nodeType !== Node.ELEMENT_NODE ||
        old.nodeName !== next.nodeName || old.getAttribute("data-row") !== next.getAttribute("data-row")) {
      old.parentNode.replaceChild(imported(next), old);
      return;
    }
    var i, attribute;
    for (i = old.attributes.length - 1; i >= 0; i--) {
      attribute = old.attributes[i];
      if (!next.hasAttribute(attribute.name)) {
        old.removeAttribute(attribute.name);
      }
    }
    for (i = 0; i < next.attributes.length; i++) {
      attribute = next.attributes[i];
      if (old.getAttribute(attribute.name) !== attribute.value) {
        old.setAttribute(attribute.name, attribute.value);
      }
    }
    morphChildren(old, next);
  }

  function morphChildren(old, next) {
    var i;
    if (old.childNodes.length !== next.childNodes.length) {
      // Rows came or went: this part is rendered afresh.
      while (old.firstChild) {
        old.removeChild(old.firstChild);
      }
      for (i = 0; i < next.childNodes.length; i++) {
        old.appendChild(imported(next.childNodes[i]));
      }
      return;
    }
    for (i = 0; i < next.childNodes.length; i++) {
      morph(old.childNodes[i], next.childNodes[i]);
    }
  }

  function schedule() {
    if (!stopped && !busy && !timer && !document.hidden) {
      timer = window.setTimeout(poll, seconds * 1000);
    }
  }

  function poll() {
    timer = 0;
    if (busy || stopped) {
      return;
    }
    busy = true;
    // redirect "manual": a session that ended answers with a redirect to
    // /login, which is not these tables.
    window.fetch(source, {credentials: "same-origin", cache: "no-store", redirect: "manual",
                          headers: {"accept": "text/html"}})
      .then(function (response) {
        if (response.type === "opaqueredirect" || response.status === 401 || response.status === 403) {
          stopped = true;
          say("Signed out: reload the page to sign in again.");
          return null;
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (text) {
        if (text === null) {
          return;
        }
        morphChildren(root, new window.DOMParser().parseFromString(text, "text/html").body);
        say("Refreshing by itself every " + seconds + " s.");
      })
      .catch(function () {
        say("Could not refresh (is the hub restarting?); trying again.");
      })
      .then(function () {
        busy = false;
        schedule();
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && !timer && !busy && !stopped) {
      poll();
    }
  });
  say("Refreshing by itself every " + seconds + " s.");
  schedule();
}());
