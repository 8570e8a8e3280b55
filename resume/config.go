package resume

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// Config tunes one side of a session. The zero value is not usable: start
// from DefaultConfig and change what you need, then Validate.
type Config struct {
	// ReconnectTimeout is how long a session waits in DISCONNECTED for a
	// new link before it is closed and its buffers freed. The client
	// proposes one in HELLO, the gateway caps it with its own: the
	// effective value is the smaller. 0 disables resumption: the session
	// ends when its first link does.
	ReconnectTimeout time.Duration

	// BufferSize is the replay buffer limit per direction: Write blocks
	// once this many bytes are written but not yet acknowledged by the
	// peer. It is also the receive window offered to the peer: at most
	// this many bytes are held that the application has not read yet.
	// Buffers grow on demand in chunks; an idle session holds none.
	BufferSize int

	// DisconnectedBufferSize is the larger replay limit that applies while
	// the session has no link, so a parked upstream can keep sending. After
	// a resume the normal limit returns once the buffered data has drained
	// to 80% of BufferSize. Values below BufferSize mean BufferSize.
	DisconnectedBufferSize int

	// PingInterval: a link on which nothing arrived for this long gets a
	// PING. LivenessTimeout: a link on which nothing arrived for this long
	// is declared dead (a blackholed path is found this fast).
	PingInterval    time.Duration
	LivenessTimeout time.Duration

	// KeepaliveInterval is how long an idle link (nothing unacknowledged)
	// may stay silent before the client sends a PING; the gateway waits
	// twice as long before it pings itself. It keeps NAT bindings alive
	// and bounds how long a dead path under an idle session goes unseen:
	// KeepaliveInterval + LivenessTimeout on the client, twice the
	// interval plus LivenessTimeout on the gateway. PingInterval and
	// LivenessTimeout govern busy links. 0 disables idle probing, for a
	// transport with keep-alives of its own (QUIC).
	//
	// On a TCP link (plain or under TLS) the probes are the kernel's
	// (SO_KEEPALIVE: the first after the interval of silence, then one
	// every PingInterval, the link dead once LivenessTimeout's worth of
	// them, and at least 10, went unanswered), so an idle session wakes
	// neither process: no goroutine, timer or system call in user space,
	// for a dead path found a few seconds later than with PINGs.
	// A PING frame is the probe where the kernel's cannot be: a
	// KeepaliveInterval under a second, a link that is not a TCP socket,
	// or KeepalivePing.
	KeepaliveInterval time.Duration

	// KeepalivePing makes the idle probe a PING frame on TCP links too.
	// Set it when a middlebox that terminates TCP (a load balancer in TCP
	// mode) sits between client and gateway and times idle connections
	// out: its kernel answers the kernel's probes, so they neither reach
	// the peer nor keep the middlebox's two connections busy; frames do.
	KeepalivePing bool

	// HandshakeTimeout bounds dialing plus HELLO/RESUME on a new link, on
	// both sides; a peer that connects and says nothing is dropped.
	HandshakeTimeout time.Duration

	// AckDelay bounds how long received bytes may wait for an ACK when
	// fewer than a quarter of the window arrived (bulk data is acked by
	// bytes, not by time). Each ACK costs both proxies a wake-up, so a
	// request/response stream pays for it: the default is Linux's own
	// delayed-ACK minimum (40 ms), at which a 64-byte ping-pong cost each
	// proxy 10-20 % less CPU than at 5 ms, and its p99 fell a fifth. The
	// price is memory: a sender holds what it sent up to AckDelay longer,
	// at most a quarter of the window. (A resume is not affected: RESUME
	// and RESUMED say what arrived, acknowledged or not.)
	AckDelay time.Duration

	// LingerTimeout bounds how long Close waits for the peer to
	// acknowledge what was written (it may not be reading). Past it the
	// session is aborted with CodeTimeout, so Close always returns.
	LingerTimeout time.Duration

	// DialAddr, if set, dials a link to a given gateway address: a client
	// uses it when its gateway sends GOAWAY naming another address (an
	// operator moving sessions to another listener). nil: such a GOAWAY
	// moves the session to a new link at the usual address.
	DialAddr func(ctx context.Context, addr string) (net.Conn, error)

	// Strategy decides when a client retries after a link failure.
	Strategy ReconnectStrategy

	// Budget, if set, is a memory limit shared by the sessions that use
	// this Config (a client sidecar's); see Budget. A gateway uses its
	// ServerConfig.MemoryBudget instead.
	Budget *Budget

	// Redials, if set, caps the reconnect attempts in flight at once of
	// the sessions that share it (a client sidecar's); see RedialGate.
	// nil: no cap.
	Redials *RedialGate

	// Hooks, if set, report session events for metrics.
	Hooks *Hooks

	// Logger receives state transitions and session events. nil: discard.
	Logger *slog.Logger
}

// Defaults. Why these numbers:
//   - 60 s reconnect timeout: Diffusion's default (protocol.md §9); covers a Wi-Fi roam, a
//     laptop lid, a router restart.
//   - 2 MiB buffer: enough to keep a 1 Gbit/s, 15 ms path full (Teleport
//     measured the same), and free when idle because buffers are chunked.
//   - 8 MiB while disconnected: lets a chatty upstream keep writing for a
//     while before TCP backpressure reaches it.
//   - ping 1 s, dead after 4 s: a busy link (data unacknowledged) on a
//     blackholed path is found in 4 s.
//   - keepalive 60 s: an idle link costs a kernel probe and its answer a
//     minute (a 12-byte PING and PONG where the kernel cannot probe;
//     9,000 idle sessions: 150 a second), well within the idle
//     timeouts of TCP middleboxes (4 min on Azure's load balancer, 350 s
//     on AWS's NLB, hours on home routers), and a dead path under an idle
//     session is found within 64 s by the client, 124 s by the gateway
//     (70 and 130 s by the kernel's probes, of which it takes 10).
//     QUIC links turn it off: the connection has keep-alives of its own
//     (they are what keeps a UDP binding, which may last only 30 s).
const (
	DefaultReconnectTimeout  = 60 * time.Second
	DefaultBufferSize        = 2 << 20
	DefaultDisconnectedLimit = 8 << 20
	DefaultPingInterval      = time.Second
	DefaultLivenessTimeout   = 4 * time.Second
	DefaultKeepaliveInterval = 60 * time.Second
	DefaultHandshakeTimeout  = 5 * time.Second
	DefaultAckDelay          = 40 * time.Millisecond
	DefaultLingerTimeout     = 10 * time.Second

	// maxBufferSize keeps windows inside the u32 of HELLO/WELCOME.
	maxBufferSize = 1 << 30
)

// AttentionWindow is how long after sending DATA a link stays watched
// (probed after PingInterval of silence, dead after LivenessTimeout) even
// once everything is acknowledged: an application that sent a request
// waits for the answer, and must learn fast that the path died under it.
// 30 s covers the request timeouts of most protocols. The client's
// window ends one answered PING after the answer; the gateway keeps none
// on a kernel-probed TCP link (attentionFrom says why).
const AttentionWindow = 30 * time.Second

// DefaultConfig returns a Config with the defaults above and the default
// reconnect strategy.
func DefaultConfig() *Config {
	return &Config{
		ReconnectTimeout:       DefaultReconnectTimeout,
		BufferSize:             DefaultBufferSize,
		DisconnectedBufferSize: DefaultDisconnectedLimit,
		PingInterval:           DefaultPingInterval,
		LivenessTimeout:        DefaultLivenessTimeout,
		KeepaliveInterval:      DefaultKeepaliveInterval,
		HandshakeTimeout:       DefaultHandshakeTimeout,
		AckDelay:               DefaultAckDelay,
		LingerTimeout:          DefaultLingerTimeout,
		Strategy:               DefaultStrategy(),
	}
}

// Validate reports the first setting that cannot work.
func (c *Config) Validate() error {
	switch {
	case c == nil:
		return errors.New("resume: nil Config")
	case c.ReconnectTimeout < 0:
		return fmt.Errorf("resume: ReconnectTimeout %v is negative", c.ReconnectTimeout)
	case c.ReconnectTimeout > time.Duration(1<<32-1)*time.Millisecond:
		return fmt.Errorf("resume: ReconnectTimeout %v is over the protocol's 49 days", c.ReconnectTimeout)
	case c.BufferSize < frame.MaxPayload:
		return fmt.Errorf("resume: BufferSize %d is below one frame (%d)", c.BufferSize, frame.MaxPayload)
	case c.BufferSize > maxBufferSize || c.DisconnectedBufferSize > maxBufferSize:
		return fmt.Errorf("resume: buffer sizes are capped at %d", maxBufferSize)
	case c.PingInterval <= 0:
		return fmt.Errorf("resume: PingInterval %v must be positive", c.PingInterval)
	case c.LivenessTimeout <= c.PingInterval:
		return fmt.Errorf("resume: LivenessTimeout %v must exceed PingInterval %v", c.LivenessTimeout, c.PingInterval)
	case c.KeepaliveInterval != 0 && c.KeepaliveInterval < c.PingInterval:
		return fmt.Errorf("resume: KeepaliveInterval %v must be 0 or at least PingInterval %v", c.KeepaliveInterval, c.PingInterval)
	case c.HandshakeTimeout <= 0:
		return fmt.Errorf("resume: HandshakeTimeout %v must be positive", c.HandshakeTimeout)
	case c.AckDelay <= 0:
		return fmt.Errorf("resume: AckDelay %v must be positive", c.AckDelay)
	case c.LingerTimeout <= 0:
		return fmt.Errorf("resume: LingerTimeout %v must be positive", c.LingerTimeout)
	case c.Strategy == nil:
		return errors.New("resume: Strategy is nil")
	}
	return nil
}

func (c *Config) disconnectedLimit() int {
	return max(c.DisconnectedBufferSize, c.BufferSize)
}

func (c *Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}

// ReconnectStrategy decides how long a client waits before reconnect
// attempt n (0 for the first attempt after a link failure). The session
// stops trying when its reconnect timeout has passed, whatever the strategy
// says.
type ReconnectStrategy interface {
	Delay(attempt int) time.Duration
}

// FixedInterval retries every Interval; Diffusion's default is 5 s. The
// first attempt after a failure waits too.
type FixedInterval struct{ Interval time.Duration }

func (f FixedInterval) Delay(int) time.Duration { return f.Interval }

// Backoff retries at once, then after Initial, doubling up to Max, each
// delay spread by ±Jitter (a fraction) so that the sessions cut by one
// network failure do not reconnect in lockstep.
type Backoff struct {
	Initial time.Duration
	Max     time.Duration
	Jitter  float64
}

func (b Backoff) Delay(attempt int) time.Duration {
	if attempt == 0 {
		return 0
	}
	d := b.Initial
	for i := 1; i < attempt && d < b.Max; i++ {
		d *= 2
	}
	d = min(d, b.Max)
	if b.Jitter > 0 {
		d += time.Duration((rand.Float64()*2 - 1) * b.Jitter * float64(d))
	}
	return max(d, 0)
}

// DefaultStrategy is Backoff{50ms, 1s, 0.2}. Why not Diffusion's fixed 5 s:
// most outages are short (a roam, a NAT rebinding, a flapping port), and
// with a 5 s interval the application would wait 2.5 s on average after the
// network came back. Starting at once and capping at 1 s keeps the pause
// after the network returns under about a second, while the jitter and the
// doubling keep a gateway from being hit by every client at the same
// instant after a shared outage.
func DefaultStrategy() ReconnectStrategy {
	return Backoff{Initial: 50 * time.Millisecond, Max: time.Second, Jitter: 0.2}
}

// Hooks are called on session events, after the session's lock is
// released, on the goroutine where the event happened: they must not
// block. Any of them may be nil.
type Hooks struct {
	// Resumed: a new link is attached after a failure or a migration;
	// outage is from the link's loss to now (0 for a migration).
	Resumed func(outage time.Duration)
	// FirstByte: the first DATA byte moved (either way) on a resumed link,
	// this long after the link was attached: what an application waits
	// after the network is back, on top of the handshake.
	FirstByte func(sinceAttach time.Duration)
}
