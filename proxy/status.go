package proxy

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// StatusHandler serves /metrics (Prometheus text format from reg),
// /healthz ("ok", or 503 "draining") and /sessions (JSON list of live
// sessions).
func StatusHandler(reg *prometheus.Registry, sessions func() []SessionInfo, draining func() bool) http.Handler {
	return statusHandler(reg, sessions, draining, nil)
}

// ClientStatusHandler is StatusHandler for a client sidecar: /healthz is
// also 503, with the reason, while accepting application connections fails
// (AcceptErr).
func ClientStatusHandler(reg *prometheus.Registry, c *Client) http.Handler {
	return statusHandler(reg, c.Sessions, c.Draining, c.AcceptErr)
}

// statusHandler is StatusHandler; unhealthy, if set, gives a reason for
// /healthz to answer 503.
func statusHandler(reg *prometheus.Registry, sessions func() []SessionInfo, draining func() bool, unhealthy func() error) http.Handler {
	mux := http.NewServeMux()
	if reg != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if draining != nil && draining() {
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("draining\n"))
			return
		}
		if unhealthy != nil {
			if err := unhealthy(); err != nil {
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprintf(w, "unhealthy: %s\n", strings.ReplaceAll(err.Error(), "\n", "; "))
				return
			}
		}
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /sessions", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		list := sessions()
		if list == nil {
			list = []SessionInfo{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(map[string]any{"sessions": list, "count": len(list)})
	})
	return mux
}

// GatewayStatusHandler is StatusHandler plus one operator action:
// POST /sessions/{id}/goaway moves that session to a new link (GoAway).
// /healthz is also 503, with the reason, while accepting links fails
// (AcceptErr). Bind the status address to loopback or a management
// network.
func GatewayStatusHandler(reg *prometheus.Registry, g *Gateway) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", statusHandler(reg, g.Sessions, g.Draining, g.AcceptErr))
	mux.HandleFunc("POST /sessions/{id}/goaway", func(w http.ResponseWriter, r *http.Request) {
		err := g.GoAway(r.PathValue("id"), "operator request")
		switch {
		case errors.Is(err, ErrNoSession):
			http.Error(w, err.Error(), http.StatusNotFound)
		case err != nil:
			http.Error(w, err.Error(), http.StatusConflict)
		default:
			w.WriteHeader(http.StatusAccepted)
			w.Write([]byte("moving\n"))
		}
	})
	return mux
}
