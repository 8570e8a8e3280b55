package faultnet

import (
	"net"
	"sync"
	"sync/atomic"

	proxyproto "github.com/pires/go-proxyproto"
)

// Balancer is a small L4 round-robin load balancer for tests where
// HAProxy is not installed: each connection goes to the next backend that
// is not marked down and accepts it, optionally preceded by a PROXY v2
// header naming the client (HAProxy's send-proxy-v2). Its connections can
// be broken as a Relay's.
type Balancer struct {
	ln      net.Listener
	proxyV2 bool

	mu       sync.Mutex
	backends []string
	source   *net.TCPAddr // local address of backend connections; nil: any
	down     []bool
	next     int
	pairs    map[*relayPair]struct{}
	closed   bool
	wg       sync.WaitGroup
	perNode  []atomic.Int64
	accepted atomic.Int64
}

// NewBalancer listens on listen and spreads connections over backends.
func NewBalancer(listen string, backends []string, proxyV2 bool) (*Balancer, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	b := &Balancer{ln: ln, proxyV2: proxyV2, backends: append([]string(nil), backends...),
		down: make([]bool, len(backends)), pairs: map[*relayPair]struct{}{}, perNode: make([]atomic.Int64, len(backends))}
	b.wg.Add(1)
	go b.acceptLoop()
	return b, nil
}

// Addr is the balancer's address.
func (b *Balancer) Addr() string { return b.ln.Addr().String() }

// SetDown takes backend i out of the rotation (as a failed health check
// does) or puts it back.
func (b *Balancer) SetDown(i int, down bool) {
	b.mu.Lock()
	b.down[i] = down
	b.mu.Unlock()
}

// SetSource makes the balancer connect to its backends from ip (e.g.
// 127.0.0.3, so that they see it at another address than its clients).
func (b *Balancer) SetSource(ip string) {
	b.mu.Lock()
	b.source = &net.TCPAddr{IP: net.ParseIP(ip)}
	b.mu.Unlock()
}

// Accepted is how many connections went to backend i.
func (b *Balancer) Accepted(i int) int64 { return b.perNode[i].Load() }

func (b *Balancer) acceptLoop() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		if b.closed {
			b.mu.Unlock()
			c.Close()
			return
		}
		b.wg.Add(1)
		b.mu.Unlock()
		b.accepted.Add(1)
		go b.relay(c.(*net.TCPConn))
	}
}

// dial connects to the next backend in the rotation that answers.
func (b *Balancer) dial() (*net.TCPConn, int) {
	b.mu.Lock()
	n := len(b.backends)
	order := make([]int, 0, n)
	for k := 0; k < n; k++ {
		i := (b.next + k) % n
		if !b.down[i] {
			order = append(order, i)
		}
	}
	b.next = (b.next + 1) % n
	d := net.Dialer{}
	if b.source != nil {
		d.LocalAddr = b.source
	}
	b.mu.Unlock()
	for _, i := range order {
		c, err := d.Dial("tcp", b.backends[i])
		if err == nil {
			return c.(*net.TCPConn), i
		}
	}
	return nil, -1
}

func (b *Balancer) relay(a *net.TCPConn) {
	defer b.wg.Done()
	c, i := b.dial()
	if c == nil {
		resetTCP(a)
		return
	}
	b.perNode[i].Add(1)
	if b.proxyV2 {
		h := proxyproto.HeaderProxyFromAddrs(2, a.RemoteAddr(), a.LocalAddr())
		if _, err := h.WriteTo(c); err != nil {
			resetTCP(a)
			resetTCP(c)
			return
		}
	}
	relayBoth(&b.mu, b.pairs, &b.closed, a, c)
}

// Break breaks every current connection in the given way and returns how
// many it hit.
func (b *Balancer) Break(mode Mode) int {
	return breakPairs(pairsOf(&b.mu, b.pairs), mode)
}

// Close stops the balancer and resets every connection.
func (b *Balancer) Close() error {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	err := b.ln.Close()
	b.Break(Reset)
	b.wg.Wait()
	return err
}

func breakPairs(ps []*relayPair, mode Mode) int {
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
	return n
}
