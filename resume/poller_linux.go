//go:build linux

package resume

import (
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sharedPollerOK says whether idle link readers may park in the shared
// poller instead of keeping a goroutine each.
const sharedPollerOK = true

// pollerLinger is how long the shared epoll instance (and its dispatcher
// goroutine) outlives its last registration: a process whose one session
// turns idle and busy in turn must not create an instance each time, and
// a process with no sessions (a test's end) must not keep a goroutine.
var pollerLinger = 50 * time.Millisecond

// poller is the process's shared readiness poller: one epoll instance of
// our own, whose fd is itself waited on through Go's netpoller by one
// dispatcher goroutine. An idle link's reader registers its socket
// (EPOLLONESHOT) and returns; when the socket turns readable, the
// dispatcher starts a goroutine that continues the reader. So an idle
// link costs a map entry instead of a parked goroutine and its stack.
//
// Registrations are keyed by an id that is never reused (a socket's fd
// number may be, once it is closed), and every registration is removed
// (EPOLL_CTL_DEL) under mu when it leaves the map, before anyone can close
// its socket: the link closes its socket only after unregistering.
type poller struct {
	mu     sync.Mutex
	ep     *epollInst // nil: none open
	regs   map[uint64]pollReg
	next   uint64
	linger *time.Timer // closes ep once regs stays empty
}

// pollTarget is what a registration wakes: a parked link reader, or a
// parked Feed.
type pollTarget interface{ fired(id uint64) }

type pollReg struct {
	l  pollTarget
	rc syscall.RawConn
	ep *epollInst
}

// epollInst is one epoll instance and the file the dispatcher waits on.
type epollInst struct {
	fd int
	f  *os.File
}

var readPoller = &poller{regs: map[uint64]pollReg{}}

// register adds rc's socket for one readiness report to l (l.fired). The
// caller holds the lock that l.fired takes (l.rp.mu, feed.mu).
func (p *poller) register(l pollTarget, rc syscall.RawConn) (uint64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ep == nil {
		ep, err := newEpoll()
		if err != nil {
			return 0, err
		}
		p.ep = ep
		// Owned by the poller: it returns once ep is closed, which
		// happens pollerLinger after the last registration is gone.
		go p.run(ep)
	}
	p.next++
	id := p.next
	var cerr error
	err := rc.Control(func(fd uintptr) {
		// Level-triggered: data that came since the caller's last look
		// is reported at once, so no wake-up is lost.
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(uint32(id)), Pad: int32(uint32(id >> 32))}
		cerr = unix.EpollCtl(p.ep.fd, unix.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		p.idleLocked()
		return 0, fmt.Errorf("resume: shared poller: %w", err)
	}
	if p.linger != nil {
		p.linger.Stop()
	}
	p.regs[id] = pollReg{l: l, rc: rc, ep: p.ep}
	return id, nil
}

// unregister removes registration id, if it is still there, and reports
// whether it was.
func (p *poller) unregister(id uint64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.removeLocked(id)
	return ok
}

// removeLocked takes id out of the epoll instance and the map. Caller
// holds mu.
func (p *poller) removeLocked(id uint64) (pollReg, bool) {
	r, ok := p.regs[id]
	if !ok {
		return r, false
	}
	delete(p.regs, id)
	r.rc.Control(func(fd uintptr) {
		unix.EpollCtl(r.ep.fd, unix.EPOLL_CTL_DEL, int(fd), nil)
	})
	p.idleLocked()
	return r, true
}

// idleLocked arms the linger timer once nothing is registered. Caller
// holds mu.
func (p *poller) idleLocked() {
	if len(p.regs) > 0 || p.ep == nil {
		return
	}
	if p.linger == nil {
		p.linger = time.AfterFunc(pollerLinger, p.closeIdle)
	} else {
		p.linger.Reset(pollerLinger)
	}
}

// closeIdle closes the epoll instance if nothing registered since the
// linger timer was armed; its dispatcher then returns.
func (p *poller) closeIdle() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.regs) == 0 && p.ep != nil {
		p.ep.f.Close()
		p.ep = nil
	}
}

// registered is the number of registrations (for tests).
func (p *poller) registered() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.regs)
}

func newEpoll() (*epollInst, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	// Non-blocking, so that os.NewFile hands it to Go's netpoller: the
	// dispatcher then waits without blocking a thread.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("epoll: set non-blocking: %w", err)
	}
	return &epollInst{fd: fd, f: os.NewFile(uintptr(fd), "lifeline-epoll")}, nil
}

// run is the dispatcher: it waits until ep has events, then hands each
// fired registration back to its link, until ep is closed.
func (p *poller) run(ep *epollInst) {
	rc, err := ep.f.SyscallConn()
	if err != nil {
		return
	}
	var evs [128]unix.EpollEvent
	for {
		n := 0
		err := rc.Read(func(fd uintptr) bool {
			for {
				k, err := epollNow(int(fd), evs[:])
				if err == unix.EINTR {
					continue
				}
				n = k
				return k > 0 || err != nil
			}
		})
		if err != nil {
			return // closed by closeIdle
		}
		for _, ev := range evs[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			p.mu.Lock()
			r, ok := p.removeLocked(id)
			p.mu.Unlock()
			if ok {
				r.l.fired(id)
			}
		}
	}
}

// readableNow reports whether the socket has data, EOF or an error now.
func readableNow(rc syscall.RawConn) bool {
	ready := false
	rc.Control(func(fd uintptr) { ready = pollNow(fd) })
	return ready
}
