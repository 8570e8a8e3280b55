package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lifeline-proxy/lifeline/internal/acceptloop"
	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// runProxy runs a gateway or client until SIGTERM/SIGINT and a drain.
func runProxy(cmd string, args []string, stdout, stderr io.Writer) error {
	st, err := parseOptions(cmd, args, stdout)
	if err != nil {
		return err
	}
	level := new(slog.LevelVar)
	if lv, err := parseLevel(st.logLevel); err == nil {
		level.Set(lv)
	}
	log := newLoggerVar(stderr, st.logFormat, level)
	metrics := proxy.NewPromMetrics()
	registerBuildInfo(metrics.Registry())
	if st.pidFile != "" {
		// Before anything listens: a second lifeline on the same pid
		// file does not start.
		stale, err := checkPIDFile(st.pidFile)
		if err != nil {
			return err
		}
		if stale != "" {
			log.Warn("pid file is stale; overwriting it", "file", st.pidFile, "why", stale)
		}
	}
	rl := newReloader(cmd, st, log, level, metrics.Registry())
	up, err := startUpgrader(log) // before any listener: they are shared with the next process
	if err != nil {
		return err
	}

	sigs, stopSignals := notifySignals()
	defer stopSignals()

	// failed gets the error of a listener that broke for good: the
	// process then ends with it instead of living on without accepting.
	failed := make(chan error, 8)
	var (
		srv    server
		stores []*transport.CertStore
		admin  http.Handler
		aerr   error
	)
	if st.tokenFile != "" {
		// Before anything listens: a proxy whose admin API cannot
		// check tokens does not start.
		if err := proxy.CheckTokenFile(st.tokenFile); err != nil {
			return err
		}
	}
	acfg := proxy.AdminConfig{Registry: metrics.Registry(), TokenFile: st.tokenFile, Logger: log}
	if cmd == "gateway" {
		gw, s, err := startGateway(st.fc.Gateway, log, metrics, failed)
		if err != nil {
			return err
		}
		srv, stores = gw, s
		rl.gw = gw
		admin, aerr = proxy.GatewayAdmin(gw, acfg)
	} else {
		cl, s, err := startClient(st.fc.Client, log, metrics, failed, rl.clientAddrs)
		if err != nil {
			return err
		}
		srv, stores = cl, s
		rl.cl = cl
		admin, aerr = proxy.ClientAdmin(cl, acfg)
	}
	if aerr != nil {
		srv.Close()
		return aerr
	}
	if st.adminAddr != "" {
		stop, err := serveAdmin(st.adminAddr, admin, st.tokenFile != "", log, failed)
		if err != nil {
			srv.Close()
			return err
		}
		defer stop()
	}
	rl.stores = stores
	// The new process of an upgrade takes the old one's sessions before
	// it serves (its listeners are paused until then).
	if err := up.takeOver(srv); err != nil {
		srv.Close()
		return err
	}
	if st.pidFile != "" {
		// Written once serving, so that it never names a process that
		// failed to start. (An upgrade's new process: see pidfile.go.)
		if err := writePIDFile(st.pidFile); err != nil {
			if !up.child() {
				srv.Close()
				return err
			}
			// The sessions are ours now: losing them for a pid
			// file would be the worse failure.
			log.Error("upgrade: pid file not written; it still names the old process", "err", err)
		}
		defer func() {
			if err := removePIDFile(st.pidFile); err != nil {
				log.Warn("pid file not removed", "err", err)
			}
		}()
	}
	// systemd (Type=notify): ready. The new process of an upgrade also
	// names itself the service's main process, before it lets the old
	// one exit (up.ready): systemd must not see the main process gone
	// without knowing the next.
	notify := func() error { return sdNotify("READY=1") }
	if up.child() {
		notify = sdNotifyMainPID
	}
	if err := notify(); err != nil {
		log.Warn("sd_notify", "err", err)
	}
	if err := up.ready(); err != nil {
		log.Warn("upgrade: readiness", "err", err)
	}
	// Once serving, so that a start that fails prints its one error line
	// only.
	log.Info("lifeline running", "version", versionString(), "go", runtime.Version(), "pid", os.Getpid(), "command", cmd)
	return waitForSignals(log, sigs, failed, srv, rl)
}

// serveAdmin serves the admin API h on addr until stop.
func serveAdmin(addr string, h http.Handler, token bool, log *slog.Logger, failed chan<- error) (stop func(), err error) {
	ln, err := adminListen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cannot listen on admin address %s: %v", addr, errText(err))
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	addr = ln.Addr().String()
	// Accept failures are retried and logged once a second by
	// acceptloop rather than by net/http at every retry.
	done := make(chan struct{})
	sl := acceptloop.Listener(ln, &acceptloop.State{Log: log.With("side", "admin"), Name: addr}, done)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Serve(sl); err != nil && !errors.Is(err, http.ErrServerClosed) {
			listenerFailed(failed, fmt.Errorf("admin listener %s: %w", addr, err))
		}
	}()
	log.Info("admin listening", "addr", addr, "token", token)
	return func() {
		close(done)
		srv.Close()
		wg.Wait()
	}, nil
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

// registerBuildInfo exports lifeline_build_info{version,goversion} 1, so
// that a dashboard (or an operator after `kill -USR2`) sees which binary
// serves.
func registerBuildInfo(reg *prometheus.Registry) {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "lifeline_build_info",
		Help: "Always 1; the labels name the running binary's version and Go version."}, []string{"version", "goversion"})
	g.WithLabelValues(versionString(), runtime.Version()).Set(1)
	reg.MustRegister(g)
}
