package resume

import "time"

// sendSide is the outgoing direction of a session: what the application
// wrote, kept until the peer acknowledges it, and where the current link
// is in it. Guarded by session.mu, except that a link's writer reads the
// bytes of its pinned batch without the lock.
//
// The buffer holds [min(acked, next, pins), End()). A chunk goes back to
// the pool (where any session may take it) only when it is acknowledged,
// the current link has moved past it, and no writer is sending from it.
type sendSide struct {
	ReplayBuffer
	next  uint64 // next offset to put on the current link
	acked uint64 // highest Received the peer stated
	// highest is the highest offset any link's writer has taken for
	// sending. The peer cannot have received more: an ACK or a resume
	// point above it is a lie (VALIDATION). It never goes down, because a
	// migrating peer legitimately acknowledges on a new link what the old
	// one delivered after its RESUME.
	highest uint64
	// pins are the first offsets of batches that writers are sending
	// without the lock (at most one per link). Bytes from the lowest pin
	// up are being read by a writev and must not be freed.
	pins     []uint64
	window   uint64 // the peer accepts up to this offset
	elevated bool   // the disconnected limit applies
	shut     bool   // CloseWrite called: CLOSE_WRITE at End()
	finSent  bool   // CLOSE_WRITE written on the current link
	finAcked bool   // the peer acked our CLOSE_WRITE
	// hole: Slices lays out a splice send, pipeHole standing in for the
	// piped bytes (spliceSend).
	hole bool
	// tx, when not nil, holds [ReplayBuffer.End(), End()) in a pipe.
	tx *txPipe
}

// pin records that a writer sends from offset from without the lock.
func (t *sendSide) pin(from uint64) { t.pins = append(t.pins, from) }

// unpin removes one pin at from (the writer is done with its batch).
func (t *sendSide) unpin(from uint64) {
	for i, p := range t.pins {
		if p == from {
			t.pins = append(t.pins[:i], t.pins[i+1:]...)
			break
		}
	}
	if len(t.pins) == 0 {
		t.pins = nil
	}
}

// release frees what is acknowledged, passed by the current link and
// pinned by no writer, and reports whether anything was freed. Bytes are
// kept even when acknowledged while the current link has yet to pass
// them: a link's stream is contiguous from its resume point, and a peer
// may acknowledge bytes an earlier link delivered before this link resends
// them.
func (t *sendSide) release() bool {
	upto := min(t.acked, t.next)
	for _, p := range t.pins {
		upto = min(upto, p)
	}
	if upto <= t.Start() {
		return false
	}
	t.Discard(upto)
	return true
}

// recvSide is the incoming direction: bytes received and not yet read by
// the application, the window advertised to the peer and what our last
// ACK said. Guarded by session.mu, except that a link's reader fills the
// buffer's lent tail without the lock.
type recvSide struct {
	ReplayBuffer
	fin     bool   // CLOSE_WRITE received and all bytes before it
	finOff  uint64 // its offset
	shut    bool   // Close called: incoming data is discarded
	window  uint64 // highest window we advertised
	ackedTo uint64 // Received in our last ACK
	// ackedWin and ackedFin are the Window and the AckFin flag of our
	// last ACK.
	ackedWin uint64
	ackedFin bool
	ackDue   bool // AckDelay passed with something unacked
	ackTimer *time.Timer
	ackArmed bool
}

// ackNeeded reports whether an ACK is due: the peer's FIN is unacked, or
// threshold bytes arrived or were consumed, or AckDelay passed with
// anything new.
func (r *recvSide) ackNeeded(threshold uint64) bool {
	if r.fin && !r.ackedFin {
		return true
	}
	newData := r.End() - r.ackedTo
	newWin := r.window - r.ackedWin
	if newData >= threshold || newWin >= threshold {
		return true
	}
	return r.ackDue && (newData > 0 || newWin > 0)
}
