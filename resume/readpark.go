package resume

import (
	"errors"
	"os"
	"syscall"
	"time"
)

// idleBeforeShared is how long a link's reader waits for its next frame
// in a goroutine of its own before it moves to the shared poller: a busy
// link (requests and answers, pings) goes on without the dispatcher's
// extra hop per frame, an idle one gives its goroutine back.
var idleBeforeShared = 100 * time.Millisecond

// errParked is what the frame reader's idle wait returns when the reader
// parked in the shared poller: the goroutine returns, and a new one goes
// on from the same frame boundary once the socket is readable.
var errParked = errors.New("resume: reader parked in the shared poller")

// idleWait is the frame reader's idle wait where its read cannot wait by
// itself (a TLS link over a TLSSocket, whose reads are told not to): it
// waits in the runtime's poller for up to idleBeforeShared (the link's read
// deadline, which nobody else uses while the link is attached), then
// registers the socket with the shared poller and returns errParked.
// Whoever takes the read deadline over (retire, finish) or closes the link
// first calls ownDeadline, which turns this off and wakes a parked reader,
// so every wake-up a blocked read would have seen still reaches the
// reader. It is idleStage, the wait, and idleSettle.
func (l *link) idleWait(rc syscall.RawConn) error {
	if done, err := l.stage(rc); done {
		return err
	}
	return l.idleSettle(rc, waitReadable(rc), true)
}

// idleStage is the frame reader's idle wait on a plain TCP link, split
// around the read that waits by itself (frame.Reader.SetIdleSettle): it
// bounds that read with the link's read deadline, idleBeforeShared away,
// and idleSettle parks the reader in the shared poller if it passed. The
// wait and the read of the next header are then a read(2) either side of
// the runtime's poller, where idleWait adds a poll(2) before and after.
func (l *link) idleStage(rc syscall.RawConn) error {
	_, err := l.stage(rc)
	return err
}

// stage begins an idle wait: an idle session's reader (controlOnly) is
// parked at once (done: err is the wait's outcome); otherwise, unless
// someone else owns the read deadline, the wait is bounded by ours
// (staged) and the caller waits.
func (l *link) stage(rc syscall.RawConn) (done bool, err error) {
	rp := &l.rp
	rp.mu.Lock()
	defer rp.mu.Unlock()
	if !rp.off && l.controlOnly() {
		if readableNow(rc) {
			return true, nil
		}
		return true, l.parkLocked(rc)
	}
	if !rp.off {
		l.conn.SetReadDeadline(time.Now().Add(idleBeforeShared))
		rp.staged = true
	}
	return false, nil
}

// idleSettle ends the wait that stage bounded: err is its error (nil:
// something came), empty whether nothing of a header was read. nil means
// read (again).
func (l *link) idleSettle(rc syscall.RawConn, err error, empty bool) error {
	rp := &l.rp
	rp.mu.Lock()
	defer rp.mu.Unlock()
	if !rp.staged {
		return err
	}
	rp.staged = false
	timeout := errors.Is(err, os.ErrDeadlineExceeded)
	if rp.off {
		// The deadline is someone else's now, set after ours: a
		// timeout may have been ours, so read (and wait) again under
		// theirs.
		if timeout {
			return nil
		}
		return err
	}
	// Ours: what follows must be read without a deadline.
	l.conn.SetReadDeadline(time.Time{})
	switch {
	case !timeout:
		return err
	case !empty:
		return nil // a header begun: read the rest
	}
	return l.parkLocked(rc)
}

// controlOnly reports that only a PING, PONG or ACK came since the
// reader's last wait and no DATA for idleBeforeShared: no application
// traffic to wait for in a goroutine, so the reader parks in the shared
// poller at once (an idle session's keepalive). An ACK in the middle of
// a request/response stream (one every AckDelay) does not count: parked
// after it, the reader took the next request through the shared poller's
// dispatcher, a goroutine hop and two epoll_ctl more, which one round
// trip in about twenty met. Caller holds rp.mu (reader-owned state).
func (l *link) controlOnly() bool {
	return !l.rp.sawData && time.Since(time.Unix(0, l.dataAt.Load())) >= idleBeforeShared
}

// parkLocked registers the reader with the shared poller and returns
// errParked, or waits the ordinary way if it cannot. Caller holds rp.mu.
func (l *link) parkLocked(rc syscall.RawConn) error {
	rp := &l.rp
	// The registration holds the reader's place in the session's wait
	// group until fired or ownDeadline hands it to a new goroutine.
	l.s.track(1)
	id, err := readPoller.register(l, rc)
	if err != nil {
		l.s.track(-1)
		rp.off = true // do not try again; wait the ordinary way
		rp.mu.Unlock()
		err = waitReadable(rc)
		rp.mu.Lock()
		return err
	}
	rp.id = id
	return errParked
}

// fired continues the reader parked under registration id: its socket is
// readable (data, EOF or an error). Called by the dispatcher.
func (l *link) fired(id uint64) {
	rp := &l.rp
	rp.mu.Lock()
	defer rp.mu.Unlock()
	if rp.id != id {
		return // woken already by ownDeadline
	}
	rp.id = 0
	l.resumeReader()
}

// ownDeadline takes the link's read deadline over from the idle wait, for
// set (if not nil) or for closing the link: the reader waits the ordinary
// way from now on, and one parked in the shared poller is unregistered and
// continued in a goroutine, which sees the deadline or the closed socket
// as a blocked read would have.
func (l *link) ownDeadline(set func()) {
	rp := &l.rp
	rp.mu.Lock()
	defer rp.mu.Unlock()
	rp.off = true
	if set != nil {
		set()
	}
	if rp.id != 0 {
		readPoller.unregister(rp.id)
		rp.id = 0
		l.resumeReader()
	}
}

// resumeReader starts a goroutine that continues a parked reader, and
// lets go of the registration's place in the wait group (after: the count
// must not touch zero in between). Caller holds rp.mu.
func (l *link) resumeReader() {
	l.s.spawn(l.readOn)
	l.s.track(-1)
}
