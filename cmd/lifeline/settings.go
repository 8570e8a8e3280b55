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
// fills in the defaults and checks the result.
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
	var st *settings
	var err error
	if o.config != "" {
		st, err = settingsFromFile(&o, set)
	} else {
		st, err = settingsFromFlags(cmd, &o, set)
	}
	if err != nil {
		return nil, err
	}
	st.fc = st.fc.withDefaults()
	if err := st.check(cmd, o.config); err != nil {
		return nil, err
	}
	return st, nil
}

// settingsFromFile reads the config file of --config. Only the flags for
// logging, status, drain and the state directory may be set with it; they
// take precedence over the file.
func settingsFromFile(o *options, set map[string]bool) (*settings, error) {
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
	st := &settings{fc: fc, logFormat: o.logFormat, logLevel: o.logLevel, statusAddr: o.statusAddr, drainTimeout: o.drainTimeout.D}
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
	return st, nil
}

// settingsFromFlags translates the flags of gateway or client into the
// config section a file would hold: a gateway with one route, or a client
// with one listener. Session settings not given on the command line stay
// unset, so that resume's defaults apply.
func settingsFromFlags(cmd string, o *options, set map[string]bool) (*settings, error) {
	st := &settings{logFormat: o.logFormat, logLevel: o.logLevel, statusAddr: o.statusAddr, drainTimeout: o.drainTimeout.D}
	sess := o.session
	if !set["reconnect-strategy"] {
		sess.ReconnectStrategy = "" // the file's way of saying the default
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
	return st, nil
}

// check reports, as a usage error, the first setting that cannot work for
// cmd; config names the file the settings came from, if any. It does not
// change st.
func (st *settings) check(cmd, config string) error {
	switch st.logFormat {
	case "text", "json":
	default:
		return usagef("--log-format %q: want text or json", st.logFormat)
	}
	if _, err := parseLevel(st.logLevel); err != nil {
		return usageError{err}
	}
	if st.statusAddr != "" {
		if err := proxy.ValidateHostPort(st.statusAddr); err != nil {
			return usagef("--status-addr: %v", err)
		}
	}
	if cmd == "gateway" {
		if st.fc.Gateway == nil {
			return usagef("config %s has no gateway section", config)
		}
		if err := validateGateway(st.fc.Gateway); err != nil {
			return usageError{err}
		}
	} else {
		if st.fc.Client == nil {
			return usagef("config %s has no client section", config)
		}
		if err := validateClient(st.fc.Client); err != nil {
			return usageError{err}
		}
	}
	return nil
}
