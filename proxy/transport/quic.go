package transport

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// The quic transport: one QUIC connection per client sidecar, one stream
// per link (quic_stream.go), accepted by quic_listener.go and opened by
// quic_dialer.go. This file holds what they share: the settings, the
// protocol constants, the stateless reset key and the UDP buffer check.

// QUICALPN is the ALPN protocol both ends of a lifeline QUIC connection
// must negotiate. A connection that negotiated anything else is closed.
const QUICALPN = "lifeline/1"

// Application error codes on QUIC connections and streams.
const (
	quicCodeClosed quic.ApplicationErrorCode = 0x0 // orderly: listener or dialer closed
	quicCodeALPN   quic.ApplicationErrorCode = 0x1 // peer did not negotiate QUICALPN

	// quicStreamClosed is sent in STOP_SENDING / RESET_STREAM when a link
	// is closed locally. The peer's Read or Write fails with a
	// *quic.StreamError carrying it: for the session engine, a link failure.
	quicStreamClosed quic.StreamErrorCode = 0x100
)

// QUICConfig tunes the QUIC transport under lifeline links. Start from
// DefaultQUICConfig.
//
// How the timers relate to the session engine's liveness (resume.Config:
// PingInterval 1 s, LivenessTimeout 4 s by default):
//
//   - Every session PINGs after a second of silence, so a QUIC connection
//     that carries at least one session is never idle while its path works.
//     Lifeline, not QUIC, decides per session that a link is dead (4 s), and
//     resumes it on a new stream.
//   - IdleTimeout is how long QUIC keeps a connection whose path is silent.
//     It must be longer than the engine's LivenessTimeout, so that an outage
//     between the two is healed by resuming every session on a new stream of
//     the same connection (one RTT, no new QUIC handshake, no stampede of
//     handshakes), and only a longer outage costs a new connection. (QUIC
//     backs off retransmissions exponentially: after an outage of D the
//     first packet through may come about 2·D after it began, so a
//     connection surely survives outages up to IdleTimeout/2.) It is also
//     the longest a dead connection (a path that never comes back, a
//     gateway that restarted with another stateless reset key) can hold up
//     resumes, so it should not be much longer. 10 s = 2.5 × the 4 s
//     liveness.
//   - KeepAlivePeriod (client only) makes an idle connection, one with no
//     sessions, send a packet now and then: it keeps NAT bindings alive
//     (home NATs drop UDP mappings after 30 s or less) and lets QUIC find a
//     dead path on its own, so the next session does not dial into a dead
//     connection. quic-go sends it at min(KeepAlivePeriod, IdleTimeout/2).
//     2 s gives four keep-alives per IdleTimeout: one lost packet does not
//     kill an idle connection.
type QUICConfig struct {
	// IdleTimeout closes a connection after this long without a packet from
	// the peer. The effective value is the smaller of the two peers'.
	IdleTimeout time.Duration
	// KeepAlivePeriod is how often an otherwise silent client sends a
	// packet (0: never). Must be below IdleTimeout.
	KeepAlivePeriod time.Duration
	// HandshakeTimeout aborts a QUIC handshake after this long without a
	// packet from the peer (and any handshake after twice this long).
	HandshakeTimeout time.Duration
	// MaxIncomingStreams is how many links (streams) one client connection
	// may hold open on the gateway at once: the number of sessions a client
	// sidecar can run over one connection, plus the few that are moving to
	// a new stream. A client beyond it waits in Dial.
	MaxIncomingStreams int64
	// MaxStreamReceiveWindow and MaxConnectionReceiveWindow cap QUIC's flow
	// control windows (auto-tuned up to these values). 0: quic-go's
	// defaults, 6 MB per stream and 15 MB per connection. The session
	// engine's own window (resume.Config.BufferSize, 2 MiB) bounds what one
	// session has in flight anyway.
	MaxStreamReceiveWindow     uint64
	MaxConnectionReceiveWindow uint64
}

// Defaults; see QUICConfig for why.
const (
	DefaultQUICIdleTimeout        = 10 * time.Second
	DefaultQUICKeepAlivePeriod    = 2 * time.Second
	DefaultQUICHandshakeTimeout   = 5 * time.Second
	DefaultQUICMaxIncomingStreams = 4096
)

// DefaultQUICConfig returns the defaults.
func DefaultQUICConfig() QUICConfig {
	return QUICConfig{
		IdleTimeout:        DefaultQUICIdleTimeout,
		KeepAlivePeriod:    DefaultQUICKeepAlivePeriod,
		HandshakeTimeout:   DefaultQUICHandshakeTimeout,
		MaxIncomingStreams: DefaultQUICMaxIncomingStreams,
	}
}

// Validate reports the first setting that cannot work.
func (c QUICConfig) Validate() error {
	switch {
	case c.IdleTimeout <= 0:
		return fmt.Errorf("quic: IdleTimeout %v must be positive", c.IdleTimeout)
	case c.KeepAlivePeriod < 0:
		return fmt.Errorf("quic: KeepAlivePeriod %v is negative", c.KeepAlivePeriod)
	case c.KeepAlivePeriod >= c.IdleTimeout:
		return fmt.Errorf("quic: KeepAlivePeriod %v must be below IdleTimeout %v", c.KeepAlivePeriod, c.IdleTimeout)
	case c.HandshakeTimeout <= 0:
		return fmt.Errorf("quic: HandshakeTimeout %v must be positive", c.HandshakeTimeout)
	case c.MaxIncomingStreams <= 0 || c.MaxIncomingStreams > 1<<60:
		return fmt.Errorf("quic: MaxIncomingStreams %d must be in [1, 2^60]", c.MaxIncomingStreams)
	}
	return nil
}

// CheckLiveness reports a problem when IdleTimeout does not exceed the
// session engine's liveness timeout: QUIC would then close connections
// before lifeline decides per session, and every outage longer than
// IdleTimeout would cost a new handshake. Not fatal; log it.
func (c QUICConfig) CheckLiveness(livenessTimeout time.Duration) error {
	if c.IdleTimeout <= livenessTimeout {
		return fmt.Errorf("quic: IdleTimeout %v should exceed the session liveness timeout %v (2-3x is right)", c.IdleTimeout, livenessTimeout)
	}
	return nil
}

func (c QUICConfig) quicConfig(server bool) *quic.Config {
	qc := &quic.Config{
		HandshakeIdleTimeout:       c.HandshakeTimeout,
		MaxIdleTimeout:             c.IdleTimeout,
		MaxStreamReceiveWindow:     c.MaxStreamReceiveWindow,
		MaxConnectionReceiveWindow: c.MaxConnectionReceiveWindow,
		MaxIncomingUniStreams:      -1, // lifeline uses bidirectional streams only
		MaxIncomingStreams:         -1, // the gateway never opens streams
	}
	if server {
		qc.MaxIncomingStreams = c.MaxIncomingStreams
	} else {
		qc.KeepAlivePeriod = c.KeepAlivePeriod
	}
	return qc
}

// statelessResetKey derives the gateway's stateless reset key from its
// private key, so that a restarted gateway with the same certificate can
// reset the connections of the previous process at once (the clients then
// redial instead of waiting for their idle timeout). Without a key that
// can be exported, a random key still resets connections this process
// forgot.
func statelessResetKey(tc *tls.Config) *quic.StatelessResetKey {
	var key quic.StatelessResetKey
	if len(tc.Certificates) > 0 && tc.Certificates[0].PrivateKey != nil {
		if der, err := x509.MarshalPKCS8PrivateKey(tc.Certificates[0].PrivateKey); err == nil {
			m := hmac.New(sha256.New, der)
			m.Write([]byte("lifeline quic stateless reset key v1"))
			copy(key[:], m.Sum(nil))
			return &key
		}
	}
	rand.Read(key[:])
	return &key
}

// wantUDPBuffer is what quic-go's documentation asks of net.core.rmem_max
// and wmem_max (quic-go itself requests 7 MiB per socket).
const wantUDPBuffer = 7500000

var udpBufferOnce sync.Once

// checkUDPBuffers warns once per process when the kernel caps UDP socket
// buffers below what quic-go wants: bursts are then dropped by the kernel
// and throughput suffers.
func checkUDPBuffers(log *slog.Logger) {
	udpBufferOnce.Do(func() {
		rmem, rerr := readSysctlInt("/proc/sys/net/core/rmem_max")
		wmem, werr := readSysctlInt("/proc/sys/net/core/wmem_max")
		if rerr != nil || werr != nil {
			return // not Linux, or no /proc: nothing to say
		}
		if rmem >= wantUDPBuffer && wmem >= wantUDPBuffer {
			return
		}
		log.Warn("quic: kernel UDP buffer limits are low; QUIC throughput may suffer. Fix: "+
			"sysctl -w net.core.rmem_max=7500000 && sysctl -w net.core.wmem_max=7500000 "+
			"(persist in /etc/sysctl.d/); see docs/quic.md",
			"rmem_max", rmem, "wmem_max", wmem, "want", wantUDPBuffer)
	})
}

func readSysctlInt(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}
