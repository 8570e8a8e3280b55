package faultnet

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// UDPRelay is a user-space UDP relay between QUIC clients and a
// gateway, for fault injection on loopback. Clients send to Addr(); each
// client source address gets its own upstream socket towards the gateway,
// so the gateway sees one source address per client, like a NAT. The relay
// can drop every packet for a while (a blackhole) and can move every
// client to a new upstream socket (a NAT rebinding: the gateway sees the
// same QUIC connection arrive from a new source port).
type UDPRelay struct {
	pc     *net.UDPConn // client-facing
	target *net.UDPAddr

	mu        sync.Mutex
	clients   map[string]*udpClient
	dropUntil time.Time
	closed    bool

	wg       sync.WaitGroup
	dropped  atomic.Int64
	rebinds  atomic.Int64
	upstream atomic.Int64 // upstream sockets opened
}

type udpClient struct {
	addr *net.UDPAddr
	up   *net.UDPConn // under relay.mu
}

// NewUDPRelay relays UDP from a loopback port to target. Close it.
func NewUDPRelay(target string) (*UDPRelay, error) {
	ta, err := net.ResolveUDPAddr("udp", target)
	if err != nil {
		return nil, err
	}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	pc.SetReadBuffer(4 << 20)
	pc.SetWriteBuffer(4 << 20)
	r := &UDPRelay{pc: pc, target: ta, clients: map[string]*udpClient{}}
	r.wg.Add(1)
	go r.fromClients()
	return r, nil
}

// Addr is where clients send.
func (r *UDPRelay) Addr() string { return r.pc.LocalAddr().String() }

func (r *UDPRelay) dropping() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return time.Now().Before(r.dropUntil)
}

// Drop discards every packet, both ways, for d.
func (r *UDPRelay) Drop(d time.Duration) {
	r.mu.Lock()
	r.dropUntil = time.Now().Add(d)
	r.mu.Unlock()
}

// Rebind moves every client to a new upstream socket: from now on the
// gateway sees each client from a new source port, and packets it sends to
// the old port are lost. It returns the number of clients moved.
func (r *UDPRelay) Rebind() (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, c := range r.clients {
		up, err := r.dialUp()
		if err != nil {
			return n, err
		}
		old := c.up
		c.up = up
		r.wg.Add(1)
		go r.fromGateway(c, up)
		old.Close()
		n++
	}
	r.rebinds.Add(1)
	return n, nil
}

func (r *UDPRelay) dialUp() (*net.UDPConn, error) {
	up, err := net.DialUDP("udp", nil, r.target)
	if err != nil {
		return nil, err
	}
	up.SetReadBuffer(4 << 20)
	up.SetWriteBuffer(4 << 20)
	r.upstream.Add(1)
	return up, nil
}

func (r *UDPRelay) fromClients() {
	defer r.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, from, err := r.pc.ReadFromUDP(buf)
		if err != nil {
			return
		}
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			return
		}
		key := from.String()
		c := r.clients[key]
		if c == nil {
			up, err := r.dialUp()
			if err != nil {
				r.mu.Unlock()
				continue
			}
			c = &udpClient{addr: from, up: up}
			r.clients[key] = c
			r.wg.Add(1)
			go r.fromGateway(c, up)
		}
		up := c.up
		drop := time.Now().Before(r.dropUntil)
		r.mu.Unlock()
		if drop {
			r.dropped.Add(1)
			continue
		}
		up.Write(buf[:n])
	}
}

// fromGateway relays what the gateway sends to one upstream socket back to
// its client, until that socket is replaced or the relay closes.
func (r *UDPRelay) fromGateway(c *udpClient, up *net.UDPConn) {
	defer r.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, err := up.Read(buf)
		if err != nil {
			return
		}
		if r.dropping() {
			r.dropped.Add(1)
			continue
		}
		r.pc.WriteToUDP(buf[:n], c.addr)
	}
}

// Close stops the relay and waits for its goroutines.
func (r *UDPRelay) Close() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return
	}
	r.closed = true
	r.pc.Close()
	for _, c := range r.clients {
		c.up.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// Dropped counts the packets dropped by Drop, both ways.
func (r *UDPRelay) Dropped() int64 { return r.dropped.Load() }

// Rebinds counts Rebind calls.
func (r *UDPRelay) Rebinds() int64 { return r.rebinds.Load() }

// Upstreams counts the upstream sockets opened: one per client, and one
// more per client at each Rebind.
func (r *UDPRelay) Upstreams() int64 { return r.upstream.Load() }
