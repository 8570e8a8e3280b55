package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/acceptloop"
	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const (
	exitOK      = 0
	exitRuntime = 1
	exitUsage   = 2
)

const usageText = `lifeline keeps the TCP sessions of unmodified applications alive through
network drops.

Usage:
  lifeline gateway --listen 0.0.0.0:7000 --upstream 127.0.0.1:6379 [flags]
  lifeline client  --listen 127.0.0.1:6380 --gateway gw.example.net:7000 [flags]
  lifeline gateway|client --config FILE
  lifeline demo [--duration 20s] [--sessions 8] [--break-every 2s]
  lifeline version
  lifeline help [command]

Run "lifeline <command> --help" for the flags of a command.
`

// usageError is a mistake in the command line or config file (exit 2).
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return exitUsage
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "gateway", "client":
		err = runProxy(cmd, rest, stdout, stderr)
	case "demo":
		err = runDemo(rest, stdout, stderr)
	case "bench":
		err = runBench(rest, stdout, stderr)
	case "bench-relay":
		err = runBenchRelay(rest, stderr)
	case "version", "--version", "-version":
		fmt.Fprintf(stdout, "lifeline %s (%s)\n", versionString(), strings.Join(transport.Names(), ", "))
	case "help", "--help", "-help", "-h":
		if len(rest) > 0 && (rest[0] == "gateway" || rest[0] == "client" || rest[0] == "demo") {
			return run([]string{rest[0], "--help"}, stdout, stderr)
		}
		fmt.Fprint(stdout, usageText)
	default:
		err = usagef("unknown command %q (want gateway, client, demo, version or help)", cmd)
	}
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	fmt.Fprintf(stderr, "lifeline %s: %s\n", cmd, oneLine(err.Error()))
	var ue usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	return exitRuntime
}

func versionString() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return version
}

// options are the command-line flags of gateway and client.
type options struct {
	config       string
	listen       string
	upstream     string // gateway
	gateway      string // client
	route        string
	transport    string
	tls          transport.TLSFiles
	session      sessionFile
	logFormat    string
	logLevel     string
	statusAddr   string
	drainTimeout duration
	// gateway limits ("auto" unless set)
	maxSessions    autoInt
	memoryBudget   autoSize
	connectTimeout duration
	proxyProtocol  int
	stateDir       string // gateway
}

func newFlagSet(cmd string, o *options, stdout io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("lifeline "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	def := resume.DefaultConfig()
	o.session.ReconnectTimeout.D = def.ReconnectTimeout
	o.session.ReconnectInterval.D = 5 * time.Second
	o.session.Buffer.N = int64(def.BufferSize)
	o.session.DisconnectedBuffer.N = int64(def.DisconnectedBufferSize)
	o.session.PingInterval.D = def.PingInterval
	o.session.LivenessTimeout.D = def.LivenessTimeout
	o.session.HandshakeTimeout.D = def.HandshakeTimeout
	o.drainTimeout.D = 30 * time.Second
	o.connectTimeout.D = proxy.DefaultConnectTimeout

	fs.StringVar(&o.config, "config", "", "YAML config `file` (several routes); other flags then only set logging, status and drain")
	if cmd == "gateway" {
		fs.StringVar(&o.listen, "listen", "", "`address` to accept links from client sidecars on, e.g. 0.0.0.0:7000")
		fs.StringVar(&o.upstream, "upstream", "", "`address` of the service behind the gateway, e.g. 127.0.0.1:6379")
		fs.Var(autoIntFlag{&o.maxSessions}, "max-sessions", "maximum `number` of live sessions, new ones refused beyond (default auto: (soft RLIMIT_NOFILE - 64) / 2; 0: no limit)")
		fs.Var(autoSizeFlag{&o.memoryBudget}, "memory-budget", "`bytes` of buffers for all sessions, new sessions refused beyond (default auto: a quarter of the machine's memory or of its cgroup's limit; 0: no limit)")
		fs.Var(durationFlag{&o.connectTimeout}, "connect-timeout", "upstream connect timeout; the application gets a reset past it")
		fs.StringVar(&o.stateDir, "state-dir", "", "`directory` where a tls or quic gateway without --tls-cert keeps the key pair it generates once (default: "+stateDirHelp+"; here "+processStateDir()+")")
		fs.IntVar(&o.proxyProtocol, "proxy-protocol", 0, "send a PROXY protocol header of this `version` (1 or 2) to the upstream, naming the client sidecar's address (0: off)")
	} else {
		fs.StringVar(&o.listen, "listen", "", "local `address` applications connect to, e.g. 127.0.0.1:6380")
		fs.StringVar(&o.gateway, "gateway", "", "gateway `address`, e.g. gw.example.net:7000")
	}
	fs.StringVar(&o.route, "route", "default", "route `name` (the gateway maps it to an upstream)")
	fs.StringVar(&o.transport, "transport", "tls", "link transport: tls, quic, or tcp (unauthenticated and unencrypted: for trusted networks only)")
	fs.Var(durationFlag{&o.session.ReconnectTimeout}, "reconnect-timeout", "how long a session waits for a new link (0 disables resumption)")
	fs.StringVar(&o.session.ReconnectStrategy, "reconnect-strategy", "backoff", "client redial strategy: backoff (at once, then 50ms doubling to 1s, jittered) or fixed")
	fs.Var(durationFlag{&o.session.ReconnectInterval}, "reconnect-interval", "redial interval of the fixed strategy")
	fs.Var(sizeFlag{&o.session.Buffer}, "buffer", "replay buffer limit per direction (`bytes`, e.g. 2MiB)")
	fs.Var(sizeFlag{&o.session.DisconnectedBuffer}, "disconnected-buffer", "larger replay limit while the link is down (`bytes`)")
	fs.Var(durationFlag{&o.session.PingInterval}, "ping-interval", "send a PING after this long without traffic")
	fs.Var(durationFlag{&o.session.LivenessTimeout}, "liveness-timeout", "declare a link dead after this long without traffic")
	fs.Var(durationFlag{&o.session.HandshakeTimeout}, "handshake-timeout", "bound on dialing plus the session handshake of a link")
	fs.StringVar(&o.tls.Cert, "tls-cert", "", "TLS certificate `file` (PEM); reloaded on SIGHUP")
	fs.StringVar(&o.tls.Key, "tls-key", "", "TLS private key `file` (PEM); reloaded on SIGHUP")
	if cmd == "gateway" {
		fs.StringVar(&o.tls.CA, "tls-ca", "", "CA `file`: client certificates must chain to it (turns on mTLS)")
	} else {
		fs.StringVar(&o.tls.CA, "tls-ca", "", "CA `file` the gateway's certificate must chain to (default: system roots)")
	}
	fs.StringVar(&o.tls.ServerName, "tls-server-name", "", "expected gateway certificate `name` (default: the gateway host)")
	if cmd == "gateway" {
		o.tls.Pin = ""
	} else {
		fs.StringVar(&o.tls.Pin, "tls-pin", "", "SHA-256 `fingerprint` of the gateway's certificate (for a self-signed gateway; instead of --tls-ca)")
	}
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&o.statusAddr, "status-addr", "", "`address` for /metrics, /healthz and /sessions (off if empty)")
	fs.Var(durationFlag{&o.drainTimeout}, "drain-timeout", "on SIGTERM/SIGINT, let sessions finish this long, then close them")
	fs.Usage = func() {
		fmt.Fprintf(stdout, "Usage of lifeline %s:\n", cmd)
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	return fs
}

// parseFlags parses args with fs. --help prints fs.Usage once and returns
// flag.ErrHelp; a bad flag or value is a one-line usage error with a hint,
// without the usage text (the flag package would print it first).
func parseFlags(fs *flag.FlagSet, args []string) error {
	usage := fs.Usage
	fs.Usage = func() {}
	defer func() { fs.Usage = usage }()
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage()
			return err
		}
		return usagef("%v; run '%s --help' for usage", err, fs.Name())
	}
	return nil
}

// settings is what a gateway or client runs with, from flags or a file.
type settings struct {
	fc           *fileConfig
	logFormat    string
	logLevel     string
	statusAddr   string
	drainTimeout time.Duration
}

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

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return l, fmt.Errorf("--log-level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

func newLogger(w io.Writer, format, level string) *slog.Logger {
	lv, _ := parseLevel(level)
	opts := &slog.HandlerOptions{Level: lv}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// runProxy runs a gateway or client until SIGTERM/SIGINT and a drain.
func runProxy(cmd string, args []string, stdout, stderr io.Writer) error {
	st, err := parseOptions(cmd, args, stdout)
	if err != nil {
		return err
	}
	log := newLogger(stderr, st.logFormat, st.logLevel)
	metrics := proxy.NewPromMetrics()

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)

	// failed gets the error of a listener that broke for good: the
	// process then ends with it instead of living on without accepting.
	failed := make(chan error, 8)
	var (
		stores   []*transport.CertStore
		shutdown func(context.Context) error
		closeAll func()
		sessions func() []proxy.SessionInfo
		draining func() bool
		gateway  *proxy.Gateway
		client   *proxy.Client
	)
	if cmd == "gateway" {
		gw, stores2, err := startGateway(st.fc.Gateway, log, metrics, failed)
		if err != nil {
			return err
		}
		stores = stores2
		shutdown, closeAll, sessions, draining = gw.Shutdown, func() { gw.Close() }, gw.Sessions, gw.Draining
		gateway = gw
	} else {
		cl, stores2, err := startClient(st.fc.Client, log, metrics, failed)
		if err != nil {
			return err
		}
		stores = stores2
		shutdown, closeAll, sessions, draining = cl.Shutdown, func() { cl.Close() }, cl.Sessions, cl.Draining
		client = cl
	}
	var statusSrv *http.Server
	var statusWG sync.WaitGroup
	if st.statusAddr != "" {
		ln, err := net.Listen("tcp", st.statusAddr)
		if err != nil {
			closeAll()
			return fmt.Errorf("cannot listen on status address %s: %v", st.statusAddr, errText(err))
		}
		h := proxy.StatusHandler(metrics.Registry(), sessions, draining)
		if gateway != nil {
			h = proxy.GatewayStatusHandler(metrics.Registry(), gateway)
		} else if client != nil {
			h = proxy.ClientStatusHandler(metrics.Registry(), client)
		}
		statusSrv = &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second,
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
		addr := ln.Addr().String()
		// Accept failures are retried and logged once a second by
		// acceptloop rather than by net/http at every retry.
		statusDone := make(chan struct{})
		sl := acceptloop.Listener(ln, &acceptloop.State{Log: log.With("side", "status"), Name: addr}, statusDone)
		statusWG.Add(1)
		go func() {
			defer statusWG.Done()
			if err := statusSrv.Serve(sl); err != nil && !errors.Is(err, http.ErrServerClosed) {
				listenerFailed(failed, fmt.Errorf("status listener %s: %w", addr, err))
			}
		}()
		log.Info("status listening", "addr", addr)
		defer func() {
			close(statusDone)
			statusSrv.Close()
			statusWG.Wait()
		}()
	}

	for {
		var sig os.Signal
		select {
		case sig = <-sigs:
		case err := <-failed:
			log.Error("listener failed; exiting", "err", err)
			closeAll()
			return err
		}
		if sig == syscall.SIGHUP {
			for _, s := range stores {
				if err := s.Reload(); err != nil {
					log.Error("certificate reload failed; keeping the old ones", "err", err)
				} else {
					log.Info("certificates reloaded")
				}
			}
			continue
		}
		log.Info("draining", "signal", sig.String(), "timeout", st.drainTimeout)
		ctx, cancel := context.WithTimeout(context.Background(), st.drainTimeout)
		done := make(chan error, 1)
		go func() { done <- shutdown(ctx) }()
		select {
		case err := <-done:
			if err != nil {
				log.Warn("drain timeout passed; closed the remaining sessions")
			}
		case sig := <-sigs:
			log.Warn("second signal: closing now", "signal", sig.String())
			cancel()
			<-done
		}
		cancel()
		log.Info("stopped")
		return nil
	}
}

// listenerFailed reports a listener's Serve error on failed. Serve returns
// nil when its gateway or client was closed, so any error here, even one
// that says the listener was closed, means it died under a running proxy
// (runProxy stops listening on failed once it drains).
func listenerFailed(failed chan<- error, err error) {
	if err == nil {
		return
	}
	select {
	case failed <- err:
	default: // the process is ending with an earlier one
	}
}

// testHookListener, if set by a test, wraps each gateway link listener
// and client application listener.
var testHookListener func(net.Listener) net.Listener

// errText shortens "listen tcp 1.2.3.4:80: bind: ..." to the cause.
func errText(err error) string {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err.Error()
	}
	return err.Error()
}

func tlsStore(name string, tf transport.TLSFiles) (*transport.CertStore, error) {
	if !transport.UsesTLS(name) {
		return nil, nil
	}
	return transport.NewCertStore(tf)
}

func startGateway(g *gatewayFile, log *slog.Logger, metrics proxy.Metrics, failed chan<- error) (*proxy.Gateway, []*transport.CertStore, error) {
	sess, err := g.sessionFile.sessionConfig()
	if err != nil {
		return nil, nil, usageError{err}
	}
	sess.Logger = log
	warnQUICIdle(log, g.Transport, sess.LivenessTimeout)
	sc := resume.DefaultServerConfig()
	sc.Session = sess
	var logLimits func()
	sc.MaxSessions, sc.MemoryBudget, logLimits = gatewayLimits(g, log)
	if g.MaxHandshakes > 0 {
		sc.MaxHandshakes = g.MaxHandshakes
	}
	var routes []proxy.Route
	for _, r := range g.Routes {
		ct := r.ConnectTimeout.D
		if !r.ConnectTimeout.Set && g.ConnectTimeout.Set {
			ct = g.ConnectTimeout.D
		}
		rs, err := g.sessionFile.over(r.sessionFile).sessionConfig()
		if err != nil {
			return nil, nil, usageError{fmt.Errorf("route %q: %w", r.Name, err)}
		}
		rs.Logger = log
		routes = append(routes, proxy.Route{Name: r.Name, Upstream: r.Upstream, ConnectTimeout: ct,
			ProxyProtocol: r.ProxyProtocol, Session: rs})
	}
	var store *transport.CertStore
	var id *transport.GatewayIdentity
	var tc = (*tlsConfig)(nil)
	if transport.UsesTLS(g.Transport) && g.TLS.Cert == "" {
		// No certificate: a self-signed one, made once and kept in the
		// state directory, whose fingerprint clients pin (--tls-pin).
		// Clients never skip verification.
		if tc, id, err = gatewayIdentity(g); err != nil {
			return nil, nil, err
		}
	} else if store, err = tlsStore(g.Transport, g.TLS); err != nil {
		return nil, nil, err
	} else if store != nil {
		c, err := store.ServerConfig()
		if err != nil {
			return nil, nil, err
		}
		tc = c
	}
	gw, err := proxy.NewGateway(proxy.GatewayConfig{Routes: routes, Server: sc, Logger: log, Metrics: metrics})
	if err != nil {
		return nil, nil, usageError{err}
	}
	ll, err := transport.Listen(transport.Config{Name: g.Transport, Addr: g.Listen, TLS: tc, Logger: log})
	if err != nil {
		gw.Close()
		return nil, nil, fmt.Errorf("cannot listen on %s: %s", g.Listen, errText(err))
	}
	if testHookListener != nil {
		ll = testHookListener(ll)
	}
	go func() {
		if err := gw.Serve(ll); err != nil {
			listenerFailed(failed, fmt.Errorf("gateway listener %s: %w", ll.Addr(), err))
		}
	}()
	names := make([]string, 0, len(routes))
	for _, r := range routes {
		names = append(names, r.Name+"="+r.Upstream)
	}
	log.Info("gateway listening", "addr", ll.Addr().String(), "transport", g.Transport, "routes", strings.Join(names, ","),
		"reconnect_timeout", sess.ReconnectTimeout, "mtls", g.TLS.CA != "")
	logLimits()
	if id != nil {
		logGatewayPin(log, id, g.Transport, ll.Addr())
	}
	warnPlaintext(log, g.Transport, "listen", g.Listen)
	var stores []*transport.CertStore
	if store != nil {
		stores = append(stores, store)
	}
	return gw, stores, nil
}

func startClient(c *clientFile, log *slog.Logger, metrics proxy.Metrics, failed chan<- error) (*proxy.Client, []*transport.CertStore, error) {
	cl := proxy.NewClient(proxy.ClientConfig{Logger: log, Metrics: metrics})
	var stores []*transport.CertStore
	type pending struct {
		ln net.Listener
		r  proxy.ClientRoute
	}
	var ps []pending
	fail := func(err error) (*proxy.Client, []*transport.CertStore, error) {
		for _, p := range ps {
			p.ln.Close()
			p.r.Dialer.Close()
		}
		cl.Close()
		return nil, nil, err
	}
	for _, l := range c.Listeners {
		sess, err := l.sessionFile.sessionConfig()
		if err != nil {
			return fail(usageError{err})
		}
		sess.Logger = log
		warnQUICIdle(log, l.Transport, sess.LivenessTimeout)
		warnPlaintext(log, l.Transport, "gateway", l.Gateway)
		store, err := tlsStore(l.Transport, l.TLS)
		if err != nil {
			return fail(err)
		}
		var tc *tlsConfig
		if store != nil {
			stores = append(stores, store)
			tc = store.ClientConfig()
		}
		d, err := transport.NewDialer(transport.Config{Name: l.Transport, Addr: l.Gateway, TLS: tc, Logger: log})
		if err != nil {
			return fail(err)
		}
		ln, err := net.Listen("tcp", l.Listen)
		if err != nil {
			d.Close()
			return fail(fmt.Errorf("cannot listen on %s: %s", l.Listen, errText(err)))
		}
		ps = append(ps, pending{ln, proxy.ClientRoute{Route: l.Route, Dialer: d, Session: sess, Gateway: l.Gateway}})
	}
	for _, p := range ps {
		ln := p.ln
		if testHookListener != nil {
			ln = testHookListener(ln)
		}
		go func() {
			if err := cl.Serve(ln, p.r); err != nil {
				listenerFailed(failed, fmt.Errorf("client listener %s: %w", ln.Addr(), err))
			}
		}()
		log.Info("client listening", "addr", p.ln.Addr().String(), "gateway", p.r.Gateway, "route", p.r.Route,
			"reconnect_timeout", p.r.Session.ReconnectTimeout)
	}
	return cl, stores, nil
}

// warnQUICIdle says so when QUIC's idle timeout would close a connection
// before lifeline's liveness check decides (a long --liveness-timeout).
func warnQUICIdle(log *slog.Logger, name string, liveness time.Duration) {
	if name != "quic" {
		return
	}
	if err := transport.DefaultQUICConfig().CheckLiveness(liveness); err != nil {
		log.Warn("QUIC connections will time out before lifeline's liveness check; keep --liveness-timeout under the QUIC idle timeout",
			"liveness_timeout", liveness, "quic_idle_timeout", transport.DefaultQUICConfig().IdleTimeout)
	}
}
