// Package faultnet is the network that lifeline's tests, demo and
// benchmark run across: relays that break the links through them on
// command (TCP: reset, close, blackhole; UDP: drop, NAT rebinding) and the
// check that a seeded random stream comes back from an echo service byte
// for byte. It is not part of the product's API.
package faultnet

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// Mode is a way to break the connections through a Relay.
type Mode int

const (
	// Reset sends an RST to both sides.
	Reset Mode = iota
	// Close sends a FIN to both sides.
	Close
	// Blackhole stops forwarding silently; both sockets stay open and
	// whatever arrives is dropped, as on a dead path.
	Blackhole
)

// Modes lists every Mode, in the order of their values.
var Modes = []Mode{Reset, Close, Blackhole}

func (m Mode) String() string {
	switch m {
	case Reset:
		return "reset"
	case Close:
		return "close"
	case Blackhole:
		return "blackhole"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Relay forwards TCP connections from a local listener to a target and
// breaks them on command, to test what runs across it. It stays usable
// for new connections after a break.
type Relay struct {
	ln     net.Listener
	target string

	mu     sync.Mutex
	pairs  map[*relayPair]struct{}
	down   bool // refuse new connections (RST at once)
	closed bool
	wg     sync.WaitGroup

	accepted atomic.Int64
	breaks   atomic.Int64
}

type relayPair struct {
	a, b      *net.TCPConn
	blackhole atomic.Bool
	once      sync.Once
}

// NewRelay listens on listen (e.g. "127.0.0.1:0") and forwards to target.
func NewRelay(listen, target string) (*Relay, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	r := &Relay{ln: ln, target: target, pairs: map[*relayPair]struct{}{}}
	r.wg.Add(1)
	go r.acceptLoop()
	return r, nil
}

// Addr is the relay's listening address.
func (r *Relay) Addr() string { return r.ln.Addr().String() }

// Accepted counts connections accepted so far.
func (r *Relay) Accepted() int64 { return r.accepted.Load() }

// Breaks counts Break calls that hit at least one connection.
func (r *Relay) Breaks() int64 { return r.breaks.Load() }

// Conns is the number of connections being relayed (blackholed ones too).
func (r *Relay) Conns() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pairs)
}

// SetDown makes the relay reset new connections at once (down=true), as a
// network that is still out, or forward them again (false).
func (r *Relay) SetDown(down bool) {
	r.mu.Lock()
	r.down = down
	r.mu.Unlock()
}

func (r *Relay) acceptLoop() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		a := c.(*net.TCPConn)
		r.mu.Lock()
		if r.down || r.closed {
			r.mu.Unlock()
			resetTCP(a)
			continue
		}
		r.wg.Add(1)
		r.mu.Unlock()
		r.accepted.Add(1)
		go r.relay(a)
	}
}

func (r *Relay) relay(a *net.TCPConn) {
	defer r.wg.Done()
	c, err := net.Dial("tcp", r.target)
	if err != nil {
		resetTCP(a)
		return
	}
	relayBoth(&r.mu, r.pairs, &r.closed, a, c.(*net.TCPConn))
}

// relayBoth copies between a and b both ways until both directions end,
// with the pair registered in pairs (under mu) so that Break and Close
// reach it; if closed is already set, both get a reset instead. The Relay
// and the Balancer share it.
func relayBoth(mu *sync.Mutex, pairs map[*relayPair]struct{}, closed *bool, a, b *net.TCPConn) {
	a.SetNoDelay(true)
	b.SetNoDelay(true)
	p := &relayPair{a: a, b: b}
	mu.Lock()
	if *closed {
		mu.Unlock()
		resetTCP(a)
		resetTCP(b)
		return
	}
	pairs[p] = struct{}{}
	mu.Unlock()
	var r Relay // pipe keeps no state of its own
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); r.pipe(p, a, b) }()
	go func() { defer wg.Done(); r.pipe(p, b, a) }()
	wg.Wait()
	mu.Lock()
	delete(pairs, p)
	mu.Unlock()
}

// pairsOf lists the pairs registered in pairs (under mu).
func pairsOf(mu *sync.Mutex, pairs map[*relayPair]struct{}) []*relayPair {
	mu.Lock()
	defer mu.Unlock()
	ps := make([]*relayPair, 0, len(pairs))
	for p := range pairs {
		ps = append(ps, p)
	}
	return ps
}

// pipe copies src to dst. A FIN is passed on as a FIN; any error closes
// both sockets (with an RST where the other side did).
func (r *Relay) pipe(p *relayPair, src, dst *net.TCPConn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.blackhole.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				p.once.Do(func() { resetTCP(src); resetTCP(dst) })
				return
			}
		}
		if err != nil {
			if p.blackhole.Load() {
				// The path is dead: the other end must not learn of this
				// one's close; its own liveness timer will end it.
				src.Close()
				return
			}
			if errors.Is(err, io.EOF) {
				dst.CloseWrite()
				return
			}
			p.once.Do(func() { resetTCP(src); resetTCP(dst) })
			return
		}
	}
}

// Break breaks every current connection in the given way and returns how
// many it hit.
func (r *Relay) Break(mode Mode) int {
	ps := pairsOf(&r.mu, r.pairs)
	n := 0
	for _, p := range ps {
		switch mode {
		case Reset:
			p.once.Do(func() { resetTCP(p.a); resetTCP(p.b) })
			n++
		case Close:
			p.once.Do(func() { p.a.Close(); p.b.Close() })
			n++
		case Blackhole:
			if !p.blackhole.Swap(true) {
				n++
			}
		}
	}
	if n > 0 {
		r.breaks.Add(1)
	}
	return n
}

// Reset sends an RST both ways on every current connection.
func (r *Relay) Reset() int { return r.Break(Reset) }

// CloseConns closes every current connection with a FIN both ways.
func (r *Relay) CloseConns() int { return r.Break(Close) }

// Close stops the relay and closes every connection.
func (r *Relay) Close() error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	err := r.ln.Close()
	r.Break(Reset)
	r.wg.Wait()
	return err
}

// resetTCP closes c with an RST instead of a FIN.
func resetTCP(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}
