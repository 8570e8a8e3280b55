package main

import (
	"flag"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/lifeline-proxy/lifeline/proxy"
)

// settings is what a gateway or client runs with, from flags or a file.
type settings struct {
	fc           *fileConfig
	logFormat    string
	logLevel     string
	adminAddr    string // the admin API's address ("": none)
	tokenFile    string // its bearer token ("": none asked for)
	drainTimeout time.Duration
	pidFile      string // --pid-file ("": none)
	// What a reload needs to read the config file again with the same
	// precedence: the flags as given, and which were set.
	opts *options
	set  map[string]bool
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
	st.opts, st.set = &o, set
	st.fc = st.fc.withDefaults()
	if err := st.check(cmd, o.config); err != nil {
		return nil, err
	}
	return st, nil
}

// settingsFromFile reads the config file of --config. Only the flags for
// logging, the admin API, drain, the state directory and the pid file may
// be set with it; they take precedence over the file, at start and at
// every reload (SIGHUP).
func settingsFromFile(o *options, set map[string]bool) (*settings, error) {
	for name := range set {
		switch name {
		case "config", "log-format", "log-level", "admin-addr", "status-addr", "admin-token-file", "drain-timeout", "state-dir", "pid-file":
		default:
			return nil, usagef("--%s cannot be combined with --config; set it in the file", name)
		}
	}
	fc, err := loadConfig(o.config)
	if err != nil {
		return nil, usageError{err}
	}
	adminAddr, err := pickAdminAddr(o.adminAddr, o.statusAddr)
	if err != nil {
		return nil, err
	}
	st := &settings{fc: fc, logFormat: o.logFormat, logLevel: o.logLevel, adminAddr: adminAddr, tokenFile: o.tokenFile, drainTimeout: o.drainTimeout.D}
	if !set["log-format"] && fc.Log.Format != "" {
		st.logFormat = fc.Log.Format
	}
	if !set["log-level"] && fc.Log.Level != "" {
		st.logLevel = fc.Log.Level
	}
	if !set["admin-addr"] && !set["status-addr"] {
		a, err := pickAdminAddr(fc.AdminAddr, fc.StatusAddr)
		if err != nil {
			return nil, usagef("config %s: %v", o.config, strings.NewReplacer("--admin-addr", "admin_addr", "--status-addr", "status_addr").Replace(err.Error()))
		}
		st.adminAddr = a
	}
	if !set["admin-token-file"] && fc.AdminTokenFile != "" {
		st.tokenFile = fc.AdminTokenFile
	}
	if !set["drain-timeout"] && fc.DrainTimeout.Set {
		st.drainTimeout = fc.DrainTimeout.D
	}
	st.pidFile = o.pidFile
	if !set["pid-file"] && fc.PIDFile != "" {
		st.pidFile = fc.PIDFile
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
	adminAddr, err := pickAdminAddr(o.adminAddr, o.statusAddr)
	if err != nil {
		return nil, err
	}
	st := &settings{logFormat: o.logFormat, logLevel: o.logLevel, adminAddr: adminAddr, tokenFile: o.tokenFile, drainTimeout: o.drainTimeout.D,
		pidFile: o.pidFile}
	sess := o.session
	if !set["reconnect-strategy"] {
		sess.ReconnectStrategy = "" // the file's way of saying the default
	}
	if cmd == "gateway" {
		if set["connect-timeout"] && o.connectTimeout.D <= 0 {
			return nil, usagef("--connect-timeout %v: must be positive", o.connectTimeout.D)
		}
		if len(o.listens) == 0 || o.upstream == "" {
			return nil, usagef("--listen and --upstream are required (or --config FILE)")
		}
		g := &gatewayFile{Listen: o.listens, Transport: o.transport, TLS: o.tls, MaxSessions: o.maxSessions,
			MemoryBudget: o.memoryBudget, StateDir: o.stateDir, ConnectTimeout: o.connectTimeout, sessionFile: sess,
			NodeID: o.nodeID, Cluster: clusterFile{Listen: o.clusterListen, Peers: o.clusterPeers, KeyFile: o.clusterKeyFile},
			Routes: []routeFile{{Name: o.route, Upstream: o.upstream, ConnectTimeout: o.connectTimeout, ProxyProtocol: o.proxyProtocol}}}
		g.ProxyProtocolFrom = proxyFromFlag(o.proxyFrom, set["proxy-protocol-from"])
		g.TrustClientAppAddr = o.trustApp
		st.fc = &fileConfig{Gateway: g}
	} else {
		if o.listen == "" || o.gateway == "" {
			return nil, usagef("--listen and --gateway are required (or --config FILE)")
		}
		st.fc = &fileConfig{Client: &clientFile{Listeners: []listenerFile{{Listen: o.listen, Gateway: o.gateway,
			Route: o.route, Transport: o.transport, TLS: o.tls, sessionFile: sess}}}}
		st.fc.Client.Listeners[0].SendAppAddr = o.sendApp
		st.fc.Client.MaxRedials = o.maxRedials
	}
	return st, nil
}

// pickAdminAddr reconciles --admin-addr and its older name --status-addr.
func pickAdminAddr(admin, status string) (string, error) {
	if admin != "" && status != "" && admin != status {
		return "", usagef("--admin-addr %s and --status-addr %s differ: --status-addr is the older name of --admin-addr, give one", admin, status)
	}
	if admin != "" {
		return admin, nil
	}
	return status, nil
}

// isLoopback reports whether the host of addr (host:port) is "localhost"
// or a loopback IP. An empty host (all interfaces) is not. It decides
// whether the admin API may go without a token, so it is stricter than
// isLoopbackHostPort (which only decides a warning): no other names.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
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
	if st.adminAddr != "" {
		if err := proxy.ValidateHostPort(st.adminAddr); err != nil {
			return usagef("--admin-addr: %v", err)
		}
		if st.tokenFile == "" && !isLoopback(st.adminAddr) {
			return usagef("--admin-addr %s is not a loopback address: give --admin-token-file FILE (a bearer token) too, "+
				"or bind it to 127.0.0.1", st.adminAddr)
		}
	} else if st.tokenFile != "" {
		return usagef("--admin-token-file without --admin-addr: there is no admin API to protect")
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
