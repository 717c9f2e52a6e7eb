// The tidegate admin pages: stop/renew instances, ban/hide accounts (CTFd's
// own admin API), the config page's connection test, the expiry countdowns.
(function () {
  "use strict";

  function csrfFetch(path, options) {
    // CTFd.fetch adds the CSRF-Token header; the fallback does the same.
    if (window.CTFd && typeof window.CTFd.fetch === "function") {
      return window.CTFd.fetch(path, options);
    }
    var root = (window.init && window.init.urlRoot) || "";
    options.credentials = "same-origin";
    options.headers = {
      Accept: "application/json",
      "Content-Type": "application/json",
      "CSRF-Token": (window.init && window.init.csrfNonce) || "",
    };
    return window.fetch(root + path, options);
  }

  function call(method, path, body) {
    var options = { method: method };
    if (body !== undefined) options.body = JSON.stringify(body);
    return csrfFetch(path, options).then(
      function (resp) {
        return resp
          .json()
          .catch(function () {
            return { success: false, error: "HTTP " + resp.status };
          })
          .then(function (b) {
            b = b || {};
            b.http_status = resp.status;
            return b;
          });
      },
      function () {
        return { success: false, error: "CTFd is unreachable" };
      }
    );
  }

  function errorText(b) {
    var text = b.error;
    if (!text && b.errors) text = JSON.stringify(b.errors);
    text = text || "failed (HTTP " + b.http_status + ")";
    if (b.retry_after !== null && b.retry_after !== undefined && !/retry after/i.test(text)) {
      text += " (retry after " + b.retry_after + " s)";
    }
    return text;
  }

  function message(text, ok) {
    var el = document.getElementById("tidegate-admin-message");
    if (!el) return;
    el.textContent = text;
    el.classList.remove("d-none", "alert-info", "alert-danger", "alert-success");
    el.classList.add(ok ? "alert-success" : "alert-danger");
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
    if (h > 0) return h + "h " + (m < 10 ? "0" : "") + m + "m";
    return m + "m " + (s < 10 ? "0" : "") + s + "s";
  }

  function startCountdowns() {
    var root = document.getElementById("tidegate-admin");
    var cells = document.querySelectorAll(".tidegate-expires[data-expires-at]");
    // How long each waiting start has waited (the Waiting table).
    var waited = document.querySelectorAll(".tidegate-waited[data-queued-at]");
    if (!root || (!cells.length && !waited.length)) return;
    var serverNow = parseInt(root.getAttribute("data-now"), 10);
    var skew = isNaN(serverNow) ? 0 : serverNow - Date.now() / 1000;
    setInterval(function () {
      var now = Math.floor(Date.now() / 1000 + skew);
      cells.forEach(function (c) {
        var at = parseInt(c.getAttribute("data-expires-at"), 10);
        if (!isNaN(at)) c.textContent = remaining(at - now);
      });
      waited.forEach(function (c) {
        var since = parseInt(c.getAttribute("data-queued-at"), 10);
        if (!isNaN(since)) c.textContent = duration(now - since);
      });
    }, 1000);
  }

  function onClick(ev) {
    var btn = ev.target.closest && ev.target.closest("button");
    if (!btn) return;
    var id = btn.getAttribute("data-instance");
    if (btn.classList.contains("tidegate-admin-stop") && id) {
      btn.disabled = true;
      call("DELETE", "/plugins/tidegate/admin/api/instances/" + id).then(function (b) {
        if (b.success) {
          message("instance " + id + " stopped", true);
          var row = document.querySelector('tr[data-instance="' + id + '"]');
          if (row) row.parentNode.removeChild(row);
        } else {
          btn.disabled = false;
          message(errorText(b), false);
        }
      });
    } else if (btn.classList.contains("tidegate-admin-renew") && id) {
      btn.disabled = true;
      call("POST", "/plugins/tidegate/admin/api/instances/" + id + "/renew").then(function (b) {
        btn.disabled = false;
        if (b.success && b.data) {
          message("instance " + id + " renewed", true);
          var cell = document.querySelector('tr[data-instance="' + id + '"] .tidegate-expires');
          if (cell && b.data.expires_at) cell.setAttribute("data-expires-at", b.data.expires_at);
        } else {
          message(errorText(b), false);
        }
      });
    } else if (btn.classList.contains("tidegate-ban") || btn.classList.contains("tidegate-hide")) {
      var kind = btn.getAttribute("data-kind") === "users" ? "users" : "teams";
      var accountId = parseInt(btn.getAttribute("data-id"), 10);
      var name = btn.getAttribute("data-name");
      var ban = btn.classList.contains("tidegate-ban");
      if (isNaN(accountId)) return;
      btn.disabled = true;
      call("PATCH", "/api/v1/" + kind + "/" + accountId, ban ? { banned: true } : { hidden: true }).then(
        function (b) {
          if (b.success) {
            message((ban ? "banned " : "hid ") + (kind === "teams" ? "team " : "user ") + name, true);
            var sel = (ban ? ".tidegate-ban" : ".tidegate-hide") + '[data-kind="' + kind + '"][data-id="' + accountId + '"]';
            document.querySelectorAll(sel).forEach(function (b2) {
              b2.disabled = true;
            });
          } else {
            btn.disabled = false;
            message(errorText(b), false);
          }
        }
      );
    } else if (btn.id === "tidegate-test") {
      var out = document.getElementById("tidegate-test-result");
      out.textContent = "…";
      call("GET", "/plugins/tidegate/admin/api/status").then(function (b) {
        if (b.success) {
          out.textContent = "tidegate answers: " + b.data.workers + " worker(s)";
          out.className = "ml-2 text-success";
        } else {
          out.textContent = errorText(b);
          out.className = "ml-2 text-danger";
        }
      });
    }
  }

  function ready() {
    document.addEventListener("click", onClick);
    startCountdowns();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", ready);
  } else {
    ready();
  }
})();
