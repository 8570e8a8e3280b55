package main

import (
	"flag"
	"io"
	"time"

	"github.com/lifeline-proxy/lifeline/proxy"
)

// settings is what a gateway or client runs with, from flags or a file.
type settings struct {
	fc           *fileConfig
	logFormat    string
	logLevel     string
	statusAddr   string
	drainTimeout time.Duration
}

// parseOptions parses the flags of gateway or client, reads --config if
// given or translates the flags into the same config sections otherwise,
// and checks the result.
func parseOptions(cmd string, args []string, stdout io.Writer) (*settings, error) {
	var o options
	fs := newFlagSet(cmd, &o, stdout)
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, usagef("unexpected argument %q; run 'lifeline %s --help' for usage", fs.Arg(0), cmd)
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	st := &settings{logFormat: o.logFormat, logLevel: o.logLevel, statusAddr: o.statusAddr, drainTimeout: o.drainTimeout.D}
	if o.config != "" {
		for name := range set {
			switch name {
			case "config", "log-format", "log-level", "status-addr", "drain-timeout", "state-dir":
			default:
				return nil, usagef("--%s cannot be combined with --config; set it in the file", name)
			}
		}
		fc, err := loadConfig(o.config)
		if err != nil {
			return nil, usageError{err}
		}
		if !set["log-format"] && fc.Log.Format != "" {
			st.logFormat = fc.Log.Format
		}
		if !set["log-level"] && fc.Log.Level != "" {
			st.logLevel = fc.Log.Level
		}
		if !set["status-addr"] && fc.StatusAddr != "" {
			st.statusAddr = fc.StatusAddr
		}
		if !set["drain-timeout"] && fc.DrainTimeout.Set {
			st.drainTimeout = fc.DrainTimeout.D
		}
		if set["state-dir"] && fc.Gateway != nil {
			fc.Gateway.StateDir = o.stateDir
		}
		st.fc = fc
	} else {
		sess := o.session
		// Only what the user set; the rest are the engine's defaults.
		for name, p := range map[string]*bool{
			"reconnect-timeout": &sess.ReconnectTimeout.Set, "reconnect-interval": &sess.ReconnectInterval.Set,
			"buffer": &sess.Buffer.Set, "disconnected-buffer": &sess.DisconnectedBuffer.Set,
			"ping-interval": &sess.PingInterval.Set, "liveness-timeout": &sess.LivenessTimeout.Set,
			"handshake-timeout": &sess.HandshakeTimeout.Set,
		} {
			*p = set[name]
		}
		if sess.ReconnectStrategy == "backoff" && !set["reconnect-strategy"] {
			sess.ReconnectStrategy = ""
		}
		if cmd == "gateway" {
			if set["connect-timeout"] && o.connectTimeout.D <= 0 {
				return nil, usagef("--connect-timeout %v: must be positive", o.connectTimeout.D)
			}
			if o.listen == "" || o.upstream == "" {
				return nil, usagef("--listen and --upstream are required (or --config FILE)")
			}
			g := &gatewayFile{Listen: o.listen, Transport: o.transport, TLS: o.tls, MaxSessions: o.maxSessions,
				MemoryBudget: o.memoryBudget, StateDir: o.stateDir, ConnectTimeout: o.connectTimeout, sessionFile: sess,
				Routes: []routeFile{{Name: o.route, Upstream: o.upstream, ConnectTimeout: o.connectTimeout, ProxyProtocol: o.proxyProtocol}}}
			st.fc = &fileConfig{Gateway: g}
		} else {
			if o.listen == "" || o.gateway == "" {
				return nil, usagef("--listen and --gateway are required (or --config FILE)")
			}
			st.fc = &fileConfig{Client: &clientFile{Listeners: []listenerFile{{Listen: o.listen, Gateway: o.gateway,
				Route: o.route, Transport: o.transport, TLS: o.tls, sessionFile: sess}}}}
		}
	}
	switch st.logFormat {
	case "text", "json":
	default:
		return nil, usagef("--log-format %q: want text or json", st.logFormat)
	}
	if _, err := parseLevel(st.logLevel); err != nil {
		return nil, usageError{err}
	}
	if st.statusAddr != "" {
		if err := proxy.ValidateHostPort(st.statusAddr); err != nil {
			return nil, usagef("--status-addr: %v", err)
		}
	}
	if cmd == "gateway" {
		if st.fc.Gateway == nil {
			return nil, usagef("config %s has no gateway section", o.config)
		}
		if err := validateGateway(st.fc.Gateway); err != nil {
			return nil, usageError{err}
		}
	} else {
		if st.fc.Client == nil {
			return nil, usagef("config %s has no client section", o.config)
		}
		if err := validateClient(st.fc.Client); err != nil {
			return nil, usageError{err}
		}
	}
	return st, nil
}
