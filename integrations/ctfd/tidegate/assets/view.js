// The tidegate panel of the challenge modal (CTFd core theme, Alpine.js).
//
// CTFd loads this script again each time a challenge modal opens (it removes
// the old <script> and adds a new one), then renders view.html into the
// modal. The panel's markup waits in a <template> until this script has
// registered the TidegateInstance component, then is copied into the page
// (one component per opening). So: no top-level const/let/class (a second
// run would throw), everything inside one function, and each component
// stops its timers once its panel has left the page.
(function () {
  "use strict";

  var API = "/plugins/tidegate/api";
  var POLL_MS = 2000;
  var SLOW_POLL_MS = 30000;
  // A place in tidegate's waiting queue is asked about this often (at most;
  // a quarter of its hold_secs when that is shorter).
  var QUEUE_POLL_MS = 2500;
  // Why a start waits, in the player's words (tidegate's `reason`).
  var QUEUE_REASONS = {
    no_capacity: "every worker is busy",
    no_network: "no worker has a free network for this challenge",
    policy: "the challenge's policy holds new instances back for now",
  };

  // What CTFd calls around rendering (it resets _internal.challenge first).
  var internal = (CTFd._internal.challenge = CTFd._internal.challenge || {});
  internal.data = undefined;
  internal.renderer = null;
  internal.render = null;
  internal.preRender = function () {};
  // Called right before Alpine puts view.html into the modal: mount once
  // it is there.
  internal.postRender = function () {
    mountSoon();
  };
  internal.submit = function (preview) {
    var body = {
      challenge_id: parseInt(document.getElementById("challenge-id").value, 10),
      submission: document.getElementById("challenge-input").value,
    };
    var url = "/api/v1/challenges/attempt" + (preview ? "?preview=true" : "");
    return CTFd.fetch(url, { method: "POST", body: JSON.stringify(body) }).then(
      function (r) {
        return r.json();
      }
    );
  };

  function request(method, path) {
    // CTFd.fetch adds the session's CSRF-Token header and JSON content type.
    return CTFd.fetch(API + path, { method: method }).then(
      function (resp) {
        return resp
          .json()
          .catch(function () {
            return null;
          })
          .then(function (body) {
            if (!body || typeof body !== "object" || !("success" in body)) {
              // Not the plugin's own answer: CTFd's login redirect, or its
              // rate limit (429 {"code": 429, "message": ...}).
              body = {
                success: false,
                error:
                  resp.status === 429
                    ? "too many requests; retry in a moment"
                    : resp.status === 403
                    ? "not allowed (are you logged in?)"
                    : "unexpected answer from CTFd (HTTP " + resp.status + ")",
              };
            }
            body.http_status = resp.status;
            return body;
          });
      },
      function () {
        return { success: false, error: "CTFd is unreachable", http_status: 0 };
      }
    );
  }

  function refusal(body) {
    var text = body.error || "something went wrong";
    if (body.retry_after !== null && body.retry_after !== undefined) {
      if (!/retry after/i.test(text)) {
        text += " (retry after " + body.retry_after + " s)";
      }
    }
    return text;
  }

  function remaining(secs) {
    if (secs <= 0) return "expired";
    return duration(secs);
  }

  function duration(secs) {
    secs = Math.max(0, Math.floor(secs));
    var h = Math.floor(secs / 3600);
    var m = Math.floor((secs % 3600) / 60);
    var s = secs % 60;
    if (h > 0) return h + "h " + (m < 10 ? "0" : "") + m + "m " + (s < 10 ? "0" : "") + s + "s";
    return m + "m " + (s < 10 ? "0" : "") + s + "s";
  }

  function queued(inst) {
    return !!inst && inst.status === "queued";
  }

  function holdEvery(place) {
    var hold = place && typeof place.hold_secs === "number" ? place.hold_secs : 60;
    return Math.max(1000, Math.min(QUEUE_POLL_MS, Math.floor((hold * 1000) / 4)));
  }

  // The places this page waits in. tidegate keeps a place only while its id
  // is asked about (each GET holds it for another hold_secs), so one keeper
  // per page, kept on window across this script's reloads, asks about each
  // place whichever modal is open, or none: a player who opens another
  // challenge meanwhile keeps the place. Each answer goes to the panel that
  // shows the place, if any. A place is forgotten once admitted (the answer
  // is the instance), left, or gone (404).
  function makeKeeper() {
    var places = {}; // id -> {every, timer, listener}

    function ask(id, p) {
      p.timer = null;
      request("GET", "/instances/" + encodeURIComponent(id)).then(function (body) {
        if (places[id] !== p) return; // left meanwhile
        var data = body.success ? body.data : null;
        var waiting = queued(data);
        if (waiting) p.every = holdEvery(data);
        // A refusal other than 404 (unreachable, 429): ask again.
        var over = body.success ? !waiting : body.http_status === 404;
        if (over) {
          delete places[id];
        } else {
          p.timer = setTimeout(function () {
            ask(id, p);
          }, p.every);
        }
        if (p.listener && p.listener(body) === false) p.listener = null;
      });
    }

    return {
      hold: function (place, listener) {
        var p = places[place.id];
        if (!p) {
          p = places[place.id] = { every: holdEvery(place), timer: null, listener: null };
          p.timer = setTimeout(function () {
            ask(place.id, p);
          }, p.every);
        }
        p.listener = listener;
      },
      release: function (id) {
        var p = places[id];
        if (!p) return;
        if (p.timer) clearTimeout(p.timer);
        delete places[id];
      },
    };
  }

  var keeper = window.TidegateQueueKeeper || (window.TidegateQueueKeeper = makeKeeper());

  function component() {
    // This component's panel. Not `this.$el`: in a method run from a
    // button's @click, Alpine's $el is that button, not the panel.
    var root = null;

    return {
      challengeId: null,
      instance: null,
      error: "",
      busy: false,
      loading: true,
      countdown: "",
      // how long a place in the queue has waited
      waited: "",
      // server clock minus browser clock, in seconds
      skew: 0,
      expiredRefreshed: false,
      _tick: null,
      _poll: null,

      init: function () {
        var self = this;
        root = this.$el;
        this.challengeId = parseInt(root.getAttribute("data-challenge-id"), 10);
        this._tick = setInterval(function () {
          self.tick();
        }, 1000);
        this.refresh();
      },

      destroy: function () {
        this.stopTimers();
      },

      stopTimers: function () {
        if (this._tick) clearInterval(this._tick);
        if (this._poll) clearTimeout(this._poll);
        this._tick = null;
        this._poll = null;
      },

      alive: function () {
        if (!root || !root.isConnected) {
          this.stopTimers();
          return false;
        }
        return true;
      },

      shown: function () {
        // The modal is display:none once closed.
        return root !== null && root.offsetParent !== null;
      },

      setInstance: function (inst) {
        var before = this.instance;
        this.instance = inst || null;
        if (!inst || !before || inst.expires_at !== before.expires_at) {
          this.expiredRefreshed = false;
        }
        if (inst && typeof inst.now === "number") {
          this.skew = inst.now - Date.now() / 1000;
        }
        if (queued(inst)) {
          var self = this;
          var id = inst.id;
          keeper.hold(inst, function (body) {
            return self.onPlace(id, body);
          });
        }
        this.tick();
        this.schedulePoll();
      },

      queued: function () {
        return queued(this.instance);
      },

      // The keeper's answer about the place this panel shows; false: this
      // panel no longer shows it (closed, or showing something else).
      onPlace: function (id, body) {
        if (!this.alive() || !this.instance || this.instance.id !== id) return false;
        if (body.success && body.data) {
          this.error = "";
          // Still waiting (a fresh position), or admitted: the instance.
          this.setInstance(body.data);
        } else if (body.success || body.http_status === 404) {
          this.placeGone();
        } else {
          // Unreachable, rate limited: the keeper asks again.
          this.error = refusal(body);
        }
        return true;
      },

      placeGone: function () {
        var self = this;
        var said =
          "your place in the queue is gone (left from another page, or not asked about " +
          "for too long); start again";
        this.setInstance(null);
        return this.refresh().then(function () {
          if (!self.instance && !self.error) self.error = said;
        });
      },

      queueText: function () {
        var q = this.instance;
        if (!queued(q)) return "";
        var text =
          "Queued, position " +
          (q.position === null || q.position === undefined ? "?" : q.position) +
          " of " +
          (q.waiting === null || q.waiting === undefined ? "?" : q.waiting);
        var why = QUEUE_REASONS[q.reason] || q.reason;
        if (why) text += " (" + why + ")";
        return text + ". It starts by itself when its turn comes, while this page stays open.";
      },

      pending: function () {
        var s = this.instance && this.instance.status;
        return s === "pending" || s === "starting";
      },

      schedulePoll: function () {
        var self = this;
        if (this._poll) clearTimeout(this._poll);
        this._poll = null;
        // A place in the queue: the keeper asks about it.
        if (!this.instance || this.queued()) return;
        // Quickly while it starts; then now and then, to see it fail or
        // be stopped elsewhere (the Instances page, another teammate).
        var delay = this.pending() ? POLL_MS : SLOW_POLL_MS;
        this._poll = setTimeout(function () {
          self._poll = null;
          if (!self.alive()) return;
          if (!self.shown()) {
            self.schedulePoll();
            return;
          }
          self.refresh();
        }, delay);
      },

      tick: function () {
        if (!this.alive()) return;
        var now = Math.floor(Date.now() / 1000 + this.skew);
        this.waited =
          this.queued() && this.instance.queued_at ? duration(now - this.instance.queued_at) : "";
        if (!this.instance || !this.instance.expires_at) {
          this.countdown = "";
          return;
        }
        var left = this.instance.expires_at - now;
        this.countdown = remaining(left);
        if (left <= 0 && !this.expiredRefreshed && !this.busy) {
          this.expiredRefreshed = true;
          this.refresh();
        }
      },

      statusText: function () {
        if (this.loading) return "checking";
        if (!this.instance) return "not running";
        return this.instance.status || "pending";
      },

      statusClass: function () {
        var s = this.statusText();
        if (s === "running") return "bg-success";
        if (s.indexOf("failed") === 0) return "bg-danger";
        if (s === "pending" || s === "starting") return "bg-warning text-dark";
        if (s === "queued") return "bg-info text-dark";
        return "bg-secondary";
      },

      refresh: function () {
        var self = this;
        return request("GET", "/challenges/" + this.challengeId + "/instance").then(
          function (body) {
            self.loading = false;
            if (body.success) {
              self.error = "";
              self.setInstance(body.data);
            } else {
              self.error = refusal(body);
              // Keep watching a known instance (e.g. after a 429).
              self.schedulePoll();
            }
          }
        );
      },

      act: function (method, path, after) {
        var self = this;
        if (this.busy) return;
        this.busy = true;
        this.error = "";
        return request(method, path).then(function (body) {
          self.busy = false;
          if (body.success) {
            after(body.data);
          } else {
            self.error = refusal(body);
            // An instance that is gone (expired, stopped elsewhere).
            if (body.http_status === 404 && self.instance) self.refresh();
            // At the limit: the team has an instance this modal has not
            // seen (started from another tab or by a teammate); show it,
            // with tidegate's words kept above it.
            if (body.reason === "team_limit" && !self.instance) {
              var said = self.error;
              self.refresh().then(function () {
                if (!self.error) self.error = said;
              });
            }
          }
        });
      },

      start: function () {
        var self = this;
        return this.act("POST", "/challenges/" + this.challengeId + "/instance", function (d) {
          self.setInstance(d);
        });
      },

      renew: function () {
        var self = this;
        if (!this.instance) return;
        return this.act("POST", "/instances/" + this.instance.id + "/renew", function (d) {
          self.setInstance(d);
        });
      },

      stop: function () {
        var self = this;
        if (!this.instance) return;
        return this.act("DELETE", "/instances/" + this.instance.id, function () {
          self.setInstance(null);
        });
      },

      // Gives the place in the queue up (the same DELETE as Stop).
      leave: function () {
        var self = this;
        if (!this.queued()) return;
        var id = this.instance.id;
        return this.act("DELETE", "/instances/" + id, function () {
          keeper.release(id);
          self.setInstance(null);
        });
      },
    };
  }

  // Copies each panel's template into the page; Alpine starts the
  // component of the copy (it initialises elements added to the page).
  // Returns how many panels were mounted.
  function mount() {
    var mounted = 0;
    var hosts = document.querySelectorAll("#tidegate-panel");
    for (var i = 0; i < hosts.length; i++) {
      var host = hosts[i];
      if (host.getAttribute("data-tidegate-mounted")) continue;
      var tpl = host.querySelector("template.tidegate-panel-template");
      if (!tpl) continue;
      host.setAttribute("data-tidegate-mounted", "1");
      if (!alpine) {
        host.textContent = "The instance panel needs CTFd's core theme (Alpine.js).";
        continue;
      }
      host.appendChild(tpl.content.cloneNode(true));
      mounted++;
    }
    return mounted;
  }

  function mountSoon() {
    var tries = 0;
    (function again() {
      if (mount() === 0 && tries++ < 40) setTimeout(again, 50);
    })();
  }

  var alpine = window.Alpine && typeof window.Alpine.data === "function";
  if (alpine) {
    // Registering again on each load replaces the previous definition.
    window.Alpine.data("TidegateInstance", component);
  }
  mount();
})();
