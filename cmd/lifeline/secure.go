package main

import (
	"crypto/tls"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// stateDirHelp describes --state-dir's default.
const stateDirHelp = "$LIFELINE_STATE_DIR, else /var/lib/lifeline as root, else $XDG_STATE_HOME/lifeline or ~/.local/state/lifeline"

// defaultStateDir is where a gateway keeps its generated key pair when no
// --state-dir is given: $LIFELINE_STATE_DIR, else /var/lib/lifeline when
// running as root, else $XDG_STATE_HOME/lifeline, else
// ~/.local/state/lifeline. "" if none applies (no home directory).
func defaultStateDir(getenv func(string) string, euid int, home string) string {
	if d := getenv("LIFELINE_STATE_DIR"); d != "" {
		return d
	}
	if euid == 0 {
		return "/var/lib/lifeline"
	}
	if x := getenv("XDG_STATE_HOME"); filepath.IsAbs(x) {
		return filepath.Join(x, "lifeline")
	}
	if home != "" {
		return filepath.Join(home, ".local", "state", "lifeline")
	}
	return ""
}

func processStateDir() string {
	home, _ := os.UserHomeDir()
	return defaultStateDir(os.Getenv, os.Geteuid(), home)
}

// gatewayIdentity loads or makes the certificate of a tls or quic gateway
// without --tls-cert, kept in the state directory so that the fingerprint
// clients pin stays the same across restarts.
func gatewayIdentity(g *gatewayFile) (*tls.Config, *transport.GatewayIdentity, error) {
	dir := g.StateDir
	if dir == "" {
		dir = processStateDir()
	}
	id, err := transport.LoadOrCreateGatewayCert(dir)
	if err != nil {
		return nil, nil, err
	}
	return id.ServerTLS(), id, nil
}

const gatewayPinMsg = "gateway certificate: self-signed, kept in the state directory; clients pin its fingerprint (--tls-pin)"

// logGatewayPin tells the operator, at every start, the fingerprint of the
// gateway's generated certificate and the client command that pins it.
func logGatewayPin(log *slog.Logger, id *transport.GatewayIdentity, transport string, addr net.Addr) {
	host, port := "GATEWAY-HOST", "PORT"
	if h, p, err := net.SplitHostPort(addr.String()); err == nil {
		port = p
		if ip := net.ParseIP(h); ip != nil && !ip.IsUnspecified() {
			host = h
		}
	}
	hint := "lifeline client --listen 127.0.0.1:LOCAL-PORT --gateway " + net.JoinHostPort(host, port)
	if transport != "tls" {
		hint += " --transport " + transport
	}
	hint += " --tls-pin " + id.Fingerprint
	log.Info(gatewayPinMsg, "sha256", id.Fingerprint, "file", id.Path, "generated_now", id.Created, "client", hint)
}

// plaintextWarning is logged when the tcp transport is used beyond
// loopback.
const plaintextWarning = "transport tcp on a non-loopback address: the link is unauthenticated and unencrypted; " +
	"anyone on the path can read the sessions' data, inject data and replay a resume into them. " +
	"Use --transport tls (the default) unless this network is trusted"

// warnPlaintext logs plaintextWarning when a tcp link listens on or dials
// a non-loopback address.
func warnPlaintext(log *slog.Logger, transport, role, addr string) {
	if transport == "tcp" && !isLoopbackHostPort(addr) {
		log.Warn(plaintextWarning, role, addr)
	}
}

// isLoopbackHostPort reports whether host:port names only this machine: a
// loopback IP or "localhost". An empty or unspecified host (all
// interfaces) and any other name are not loopback.
func isLoopbackHostPort(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if ip := net.ParseIP(strings.TrimSuffix(strings.SplitN(host, "%", 2)[0], ".")); ip != nil {
		return ip.IsLoopback()
	}
	h := strings.ToLower(strings.TrimSuffix(host, "."))
	return h == "localhost" || strings.HasSuffix(h, ".localhost")
}

func tlsStore(name string, tf transport.TLSFiles) (*transport.CertStore, error) {
	if !transport.UsesTLS(name) {
		return nil, nil
	}
	return transport.NewCertStore(tf)
}
