package proxy

import (
	"context"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// certFixHint says what to do about a certificate verification failure.
func certFixHint(leaf *x509.Certificate, err error) string {
	if leaf == nil {
		return "the gateway sent no certificate; check --gateway and --transport"
	}
	fp := transport.CertFingerprint(leaf.Raw)
	hint := "if " + fp + " is the fingerprint the gateway logs at start (a gateway without --tls-cert), pin it: " +
		"--tls-pin " + fp + " (tls: {pin: ...} in a config file); if the gateway's certificate is issued by a CA, " +
		"give that CA with --tls-ca FILE"
	var he x509.HostnameError
	var hep *x509.HostnameError
	if errors.As(err, &he) || errors.As(err, &hep) {
		hint += "; if it is issued by a CA you trust but for another name, set --tls-server-name to a name it holds"
	}
	return hint
}

// notTLSFix says what to do when the gateway does not answer TLS.
const notTLSFix = "give the client and the gateway the same --transport: tls on both (the default; a gateway " +
	"started with an older lifeline used tcp by default), or tcp on both on a trusted network"

// certLogEvery rate-limits the certificate failure log line per listener.
const certLogEvery = time.Minute

// certLog logs the dial failures of a client that retrying does not heal
// (a certificate that fails verification, a gateway that does not speak
// TLS): the first one of a listener at once, then at most one of each
// kind per certLogEvery.
type certLog struct {
	mu   sync.Mutex
	seen map[certLogKey]*certLogState
}

type certLogKey struct {
	d      transport.Dialer
	notTLS bool
}

type certLogState struct {
	last       time.Time
	suppressed int
}

// report logs err if it is a certificate verification failure (or a
// gateway not speaking TLS) and the listener's last such line is older
// than certLogEvery.
func (l *certLog) report(log *slog.Logger, r ClientRoute, err error) {
	leaf, ok := transport.CertVerifyFailure(err)
	notTLS := !ok && transport.NotTLS(err)
	if !ok && !notTLS {
		return
	}
	now := time.Now()
	key := certLogKey{r.Dialer, notTLS}
	l.mu.Lock()
	if l.seen == nil {
		l.seen = map[certLogKey]*certLogState{}
	}
	st := l.seen[key]
	if st == nil {
		st = &certLogState{}
		l.seen[key] = st
	}
	if !st.last.IsZero() && now.Sub(st.last) < certLogEvery {
		st.suppressed++
		l.mu.Unlock()
		return
	}
	suppressed := st.suppressed
	st.last, st.suppressed = now, 0
	l.mu.Unlock()
	args := []any{"side", "client", "route", r.Route, "gateway", r.Gateway, "err", err}
	if notTLS {
		args = append(args, "fix", notTLSFix)
		if suppressed > 0 {
			args = append(args, "repeats_since_last_line", suppressed)
		}
		log.Error("the gateway does not speak TLS; no link to this gateway until both sides use the same --transport", args...)
		return
	}
	if leaf != nil {
		args = append(args, "gateway_sha256", transport.CertFingerprint(leaf.Raw), "gateway_subject", leaf.Subject.String())
	}
	args = append(args, "fix", certFixHint(leaf, err))
	if suppressed > 0 {
		args = append(args, "repeats_since_last_line", suppressed)
	}
	log.Error("gateway certificate verification failed; no link to this gateway until it is fixed", args...)
}

// linkDial is r's dialer as the session engine calls it, for the first
// link of a session and for every redial: a certificate failure is logged
// at once (rate-limited), not after the reconnect timeout.
func (c *Client) linkDial(r ClientRoute) resume.DialFunc {
	return func(ctx context.Context) (net.Conn, error) {
		conn, err := r.Dialer.Dial(ctx)
		if err != nil {
			c.certLog.report(c.log, r, err)
		}
		return conn, err
	}
}
