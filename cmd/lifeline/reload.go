package main

import (
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// SIGHUP: the TLS certificates and the --config file are read again. What
// can change in a running process is applied to the sessions that open
// from then on: a gateway's routes (added, removed, upstream,
// connect_timeout, proxy_protocol, session settings), its session
// defaults and connect_timeout; a client listener's route and session
// settings; log.level and drain_timeout. Live sessions keep what they
// opened with. Everything else (listeners added, removed or moved,
// transports, TLS file names, limits, the admin API, the log format, the
// pid file, settings added later that this code does not know to apply)
// is fixed for the life of the process: a reload that changes it logs a
// warning naming it, and an in-place upgrade (USR2) or a restart applies
// it. A file that does not parse or validate changes nothing.

// reloader holds what a reload works on. Only the signal loop uses it.
type reloader struct {
	cmd    string
	log    *slog.Logger
	level  *slog.LevelVar
	stores []*transport.CertStore
	gw     *proxy.Gateway
	cl     *proxy.Client
	// clientAddrs maps each client listener's configured address to its
	// listener's address (they differ for port 0).
	clientAddrs map[string]string

	// start is what the process started with: settings that need a
	// new process are compared with it. cur is what is applied now.
	start, cur *settings

	reloads *prometheus.CounterVec
	lastOK  prometheus.Gauge
}

func newReloader(cmd string, st *settings, log *slog.Logger, level *slog.LevelVar, reg *prometheus.Registry) *reloader {
	rl := &reloader{cmd: cmd, log: log, level: level, start: st, cur: st, clientAddrs: map[string]string{},
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lifeline_config_reloads_total",
			Help: "Config file reloads (SIGHUP with --config), by result: ok, or error (the file was refused and the old config kept).",
		}, []string{"result"}),
		lastOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lifeline_config_last_reload_success_timestamp_seconds",
			Help: "Unix time the config in use was loaded: at start, then at each successful reload.",
		}),
	}
	rl.reloads.WithLabelValues("ok")
	rl.reloads.WithLabelValues("error")
	rl.lastOK.SetToCurrentTime()
	if reg != nil {
		reg.MustRegister(rl.reloads, rl.lastOK)
	}
	return rl
}

func (rl *reloader) drainTimeout() time.Duration { return rl.cur.drainTimeout }

// reload is SIGHUP: certificates, then the config file if there is one.
func (rl *reloader) reload() {
	if err := sdNotifyReloading(); err != nil {
		rl.log.Warn("sd_notify", "err", err)
	}
	defer func() {
		if err := sdNotify("READY=1"); err != nil {
			rl.log.Warn("sd_notify", "err", err)
		}
	}()
	reloadCerts(rl.log, rl.stores)
	path := rl.cur.opts.config
	if path == "" {
		rl.log.Info("no --config file: only the certificates were reloaded")
		return
	}
	next, err := rl.load()
	if err == nil {
		err = rl.apply(next)
	}
	if err != nil {
		rl.reloads.WithLabelValues("error").Inc()
		rl.log.Error("config reload failed; keeping the old config", "file", path, "err", oneLine(err.Error()))
		return
	}
	changed := rl.changes(rl.cur, next)
	restart := rl.needsRestart(rl.start, next)
	rl.cur = next
	rl.reloads.WithLabelValues("ok").Inc()
	rl.lastOK.SetToCurrentTime()
	if len(changed) == 0 {
		changed = []string{"nothing"}
	}
	rl.log.Info("config reloaded", "file", path, "changed", strings.Join(changed, "; "))
	if len(restart) > 0 {
		rl.log.Warn("config reload: these changes need an upgrade in place (SIGUSR2) or a restart to take effect; until then the old values stay",
			"file", path, "settings", strings.Join(restart, "; "))
	}
}

// load reads and checks the config file as at start, with the same flags
// over it.
func (rl *reloader) load() (*settings, error) {
	st, err := settingsFromFile(rl.cur.opts, rl.cur.set)
	if err != nil {
		return nil, err
	}
	st.opts, st.set = rl.cur.opts, rl.cur.set
	st.fc = st.fc.withDefaults()
	if err := st.check(rl.cmd, rl.cur.opts.config); err != nil {
		return nil, err
	}
	return st, nil
}

// apply gives the proxy next's routes and session settings, and the log
// level; all are built and checked before any is applied.
func (rl *reloader) apply(next *settings) error {
	lv, err := parseLevel(next.logLevel)
	if err != nil {
		return err
	}
	if rl.gw != nil {
		// Session settings depend on the transport (quic: no keepalive
		// by default): the one in use, which a reload does not change.
		g := *next.fc.Gateway
		g.Transport = rl.start.fc.Gateway.Transport
		routes, err := gatewayRoutes(&g, rl.log)
		if err != nil {
			return err
		}
		lim := rl.gw.Limits()
		lim.MaxSessions, lim.MemoryBudget, _ = gatewayLimits(&g, rl.log)
		if err := lim.Validate(); err != nil {
			return err
		}
		if err := rl.gw.Reload(routes); err != nil {
			return err
		}
		if err := rl.gw.SetLimits(lim); err != nil {
			return err // checked above: cannot happen
		}
	}
	if rl.cl != nil {
		type update struct {
			addr, route string
			sess        *resume.Config
		}
		var ups []update
		for _, l := range next.fc.Client.Listeners {
			addr, ok := rl.clientAddrs[l.Listen]
			if !ok || rl.clientListenerMoved(l) {
				continue // needs a new process: needsRestart names it
			}
			sess, err := l.sessionFile.sessionConfigFor(l.Transport)
			if err != nil {
				return fmt.Errorf("client listener %s: %w", l.Listen, err)
			}
			sess.Logger = rl.log
			ups = append(ups, update{addr, l.Route, sess})
		}
		for _, u := range ups {
			if err := rl.cl.Reload(u.addr, u.route, u.sess); err != nil {
				return err
			}
		}
	}
	rl.level.Set(lv)
	return nil
}

// clientListenerMoved reports whether listener l (by its listen address)
// has a setting, beyond route and session settings, that differs from
// the one the process started with: its gateway, transport or TLS files.
func (rl *reloader) clientListenerMoved(l listenerFile) bool {
	for _, s := range rl.start.fc.Client.Listeners {
		if s.Listen == l.Listen {
			return len(fieldDiffs("", s, l, "route", "session")) > 0
		}
	}
	return true
}

// changes lists what the reload applied, old -> new.
func (rl *reloader) changes(old, next *settings) []string {
	var out []string
	if old.logLevel != next.logLevel {
		out = append(out, fmt.Sprintf("log.level %s -> %s", old.logLevel, next.logLevel))
	}
	if old.drainTimeout != next.drainTimeout {
		out = append(out, fmt.Sprintf("drain_timeout %v -> %v", old.drainTimeout, next.drainTimeout))
	}
	if og, ng := old.fc.Gateway, next.fc.Gateway; og != nil && ng != nil {
		out = append(out, fieldDiffs("gateway ", og.sessionFile, ng.sessionFile)...)
		out = append(out, fieldDiffs("gateway ", struct {
			MaxSessions  autoInt  `yaml:"max_sessions"`
			MemoryBudget autoSize `yaml:"memory_budget"`
		}{og.MaxSessions, og.MemoryBudget}, struct {
			MaxSessions  autoInt  `yaml:"max_sessions"`
			MemoryBudget autoSize `yaml:"memory_budget"`
		}{ng.MaxSessions, ng.MemoryBudget})...)
		if og.ConnectTimeout != ng.ConnectTimeout {
			out = append(out, "gateway connect_timeout "+show(reflect.ValueOf(og.ConnectTimeout))+" -> "+show(reflect.ValueOf(ng.ConnectTimeout)))
		}
		out = append(out, routeChanges(og.Routes, ng.Routes)...)
	}
	if oc, nc := old.fc.Client, next.fc.Client; oc != nil && nc != nil {
		for _, n := range nc.Listeners {
			i := slices.IndexFunc(oc.Listeners, func(o listenerFile) bool { return o.Listen == n.Listen })
			if i < 0 || rl.clientListenerMoved(n) {
				continue
			}
			o := oc.Listeners[i]
			if o.Route != n.Route {
				out = append(out, fmt.Sprintf("listener %s route %q -> %q", n.Listen, o.Route, n.Route))
			}
			out = append(out, fieldDiffs("listener "+n.Listen+" ", o.sessionFile, n.sessionFile)...)
		}
	}
	return out
}

// routeChanges lists routes added, removed and changed.
func routeChanges(old, next []routeFile) []string {
	var out []string
	for _, n := range next {
		i := slices.IndexFunc(old, func(o routeFile) bool { return o.Name == n.Name })
		if i < 0 {
			out = append(out, fmt.Sprintf("route %q added (upstream %s)", n.Name, n.Upstream))
			continue
		}
		out = append(out, fieldDiffs(fmt.Sprintf("route %q ", n.Name), old[i], n, "name")...)
	}
	for _, o := range old {
		if !slices.ContainsFunc(next, func(n routeFile) bool { return n.Name == o.Name }) {
			out = append(out, fmt.Sprintf("route %q removed", o.Name))
		}
	}
	return out
}

// needsRestart lists what differs between the config the process started
// with and next, but that a reload does not apply.
func (rl *reloader) needsRestart(start, next *settings) []string {
	var out []string
	for _, d := range []struct {
		name      string
		was, will string
	}{
		{"log.format", start.logFormat, next.logFormat},
		{"admin_addr", start.adminAddr, next.adminAddr},
		{"admin_token_file", start.tokenFile, next.tokenFile},
		{"pid_file", start.pidFile, next.pidFile},
	} {
		if d.was != d.will {
			out = append(out, fmt.Sprintf("%s %q -> %q", d.name, d.was, d.will))
		}
	}
	if (start.fc.Gateway == nil) != (next.fc.Gateway == nil) || (start.fc.Client == nil) != (next.fc.Client == nil) {
		out = append(out, "gateway or client section added or removed")
	}
	// Every gateway setting but the routes, the session defaults and
	// connect_timeout, which reloads apply; settings added to the file
	// later count here until a reload learns to apply them.
	if sg, ng := start.fc.Gateway, next.fc.Gateway; sg != nil && ng != nil {
		out = append(out, fieldDiffs("gateway ", *sg, *ng, "routes", "session", "connect_timeout", "max_sessions", "memory_budget")...)
	}
	if sc, nc := start.fc.Client, next.fc.Client; sc != nil && nc != nil {
		if sc.MaxRedials != nc.MaxRedials {
			out = append(out, fmt.Sprintf("client max_redials %d -> %d", sc.MaxRedials, nc.MaxRedials))
		}
		for _, n := range nc.Listeners {
			i := slices.IndexFunc(sc.Listeners, func(s listenerFile) bool { return s.Listen == n.Listen })
			if i < 0 {
				out = append(out, fmt.Sprintf("listener %s added", n.Listen))
				continue
			}
			out = append(out, fieldDiffs("listener "+n.Listen+" ", sc.Listeners[i], n, "route", "session")...)
		}
		for _, s := range sc.Listeners {
			if !slices.ContainsFunc(nc.Listeners, func(n listenerFile) bool { return n.Listen == s.Listen }) {
				out = append(out, fmt.Sprintf("listener %s removed", s.Listen))
			}
		}
	}
	return out
}

// fieldDiffs lists the fields of structs a and b (of one type) that
// differ, as "prefix<yaml name> old -> new", except those named in skip
// ("session" skips the inlined session settings). Inlined structs are
// compared field by field.
func fieldDiffs(prefix string, a, b any, skip ...string) []string {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	if va.Type() != vb.Type() || va.Kind() != reflect.Struct {
		panic("fieldDiffs: want two structs of one type")
	}
	var out []string
	t := va.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() && !f.Anonymous {
			continue
		}
		tag, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if f.Anonymous && opts == "inline" {
			// The inlined session settings: reflect cannot hand out an
			// unexported embedded field, its promoted method can.
			if f.Type != reflect.TypeOf(sessionFile{}) {
				panic("fieldDiffs: an inlined struct other than sessionFile")
			}
			if !slices.Contains(skip, "session") {
				out = append(out, fieldDiffs(prefix, a.(sessioned).sessionSettings(), b.(sessioned).sessionSettings(), skip...)...)
			}
			continue
		}
		if tag == "" || tag == "-" || slices.Contains(skip, tag) {
			continue
		}
		x, y := va.Field(i), vb.Field(i)
		if reflect.DeepEqual(x.Interface(), y.Interface()) {
			continue
		}
		out = append(out, prefix+tag+" "+show(x)+" -> "+show(y))
	}
	return out
}

// sessioned is a config section with session settings inlined.
type sessioned interface{ sessionSettings() sessionFile }

func (s sessionFile) sessionSettings() sessionFile { return s }

// show formats a config value as the file would hold it.
func show(v reflect.Value) string {
	switch x := v.Interface().(type) {
	case duration:
		if !x.Set {
			return "default"
		}
		return x.D.String()
	case size:
		if !x.Set {
			return "default"
		}
		return formatSize(x.N)
	case autoInt:
		if !x.Set {
			return "auto"
		}
		return fmt.Sprint(x.N)
	case autoSize:
		if !x.Set {
			return "auto"
		}
		return formatSize(x.N)
	case string:
		if x == "" {
			return `""`
		}
		return x
	case addrList:
		return "[" + strings.Join(x, ", ") + "]"
	}
	if v.Kind() == reflect.Struct || v.Kind() == reflect.Pointer || v.Kind() == reflect.Slice || v.Kind() == reflect.Map {
		return fmt.Sprintf("%+v", v.Interface())
	}
	return fmt.Sprint(v.Interface())
}
