package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// The signals a gateway or client handles: SIGTERM and SIGINT drain the
// sessions and stop, a second one stops at once; SIGHUP reloads the TLS
// certificates and the config file (reload.go).
var (
	shutdownSignals = []os.Signal{syscall.SIGTERM, syscall.SIGINT}
	reloadSignals   = []os.Signal{syscall.SIGHUP}
)

// notifySignals starts catching the shutdown and reload signals; stop
// ends that.
func notifySignals() (sigs <-chan os.Signal, stop func()) {
	c := make(chan os.Signal, 4)
	signal.Notify(c, append(append(append([]os.Signal{}, shutdownSignals...), reloadSignals...), upgradeSignals...)...)
	return c, func() { signal.Stop(c) }
}

func isReloadSignal(sig os.Signal) bool {
	for _, s := range reloadSignals {
		if sig == s {
			return true
		}
	}
	return false
}

// server is a running gateway or client.
type server interface {
	Shutdown(context.Context) error
	Close() error
}

// waitForSignals serves until a shutdown signal, then drains srv for at
// most the drain timeout and returns nil; or until a listener fails for
// good (on failed), then closes srv and returns the listener's error. A
// reload signal reloads the certificates and the config file (rl).
func waitForSignals(log *slog.Logger, sigs <-chan os.Signal, failed <-chan error, srv server, rl *reloader) error {
	for {
		var sig os.Signal
		select {
		case sig = <-sigs:
		case err := <-failed:
			log.Error("listener failed; exiting", "err", err)
			srv.Close()
			return err
		}
		if isReloadSignal(sig) {
			rl.reload()
			continue
		}
		if isUpgradeSignal(sig) {
			// systemd waits (ExecReload) until READY=1: from the new
			// process with its MAINPID, or from this one if it failed.
			if err := sdNotifyReloading(); err != nil {
				log.Warn("sd_notify", "err", err)
			}
			if upgradeOnSignal(log, srv) {
				return nil // the new process has the sessions and serves
			}
			if err := sdNotify("READY=1"); err != nil {
				log.Warn("sd_notify", "err", err)
			}
			continue
		}
		drain(log, sig, sigs, srv, rl.drainTimeout())
		return nil
	}
}

// reloadCerts reloads each store; one that fails keeps its old
// certificates.
func reloadCerts(log *slog.Logger, stores []*transport.CertStore) {
	for _, s := range stores {
		if err := s.Reload(); err != nil {
			log.Error("certificate reload failed; keeping the old ones", "err", err)
		} else {
			log.Info("certificates reloaded")
		}
	}
}

// drain shuts srv down after sig: its sessions may finish within timeout,
// then the rest are closed; another signal closes them at once.
func drain(log *slog.Logger, sig os.Signal, sigs <-chan os.Signal, srv server, timeout time.Duration) {
	log.Info("draining", "signal", sig.String(), "timeout", timeout)
	if err := sdNotify("STOPPING=1"); err != nil {
		log.Warn("sd_notify", "err", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	for {
		select {
		case err := <-done:
			if err != nil {
				log.Warn("drain timeout passed; closed the remaining sessions")
			}
		case sig := <-sigs:
			if isReloadSignal(sig) || isUpgradeSignal(sig) {
				// A HUP from log rotation or config management must
				// not end every session of a draining process.
				log.Warn("signal ignored while draining", "signal", sig.String())
				continue
			}
			log.Warn("second signal: closing now", "signal", sig.String())
			cancel()
			<-done
		}
		break
	}
	log.Info("stopped")
}
