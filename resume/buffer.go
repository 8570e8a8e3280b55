package resume

import "sync"

// chunkSize is the unit buffers grow and shrink by. Small enough that an
// almost idle session holds little, large enough that a 64 KiB frame spans
// only a few chunks.
const chunkSize = 32 << 10

// chunkPool recycles chunks between all sessions of the process. Chunks
// go back only when no goroutine can still be reading them (see
// ReplayBuffer.Discard's callers).
var chunkPool = sync.Pool{New: func() any { return new([chunkSize]byte) }}

// compactMax is the most a buffer may hold for Compact to move it out of
// its chunks: a parked session that holds a few unacknowledged bytes
// (the answer sent just before the link broke) then keeps those bytes,
// not a 32 KiB chunk, for as long as it stays parked.
const compactMax = chunkSize / 4

// ReplayBuffer holds the bytes [Start, End) of one direction of a stream,
// indexed by their absolute stream offset. The sender keeps written bytes
// here until the peer acknowledges them; the receiver keeps received bytes
// here until the application reads them. It is not safe for concurrent use:
// the session's mutex guards it. Bytes at or past End may be filled without
// the mutex through Tail, because nobody else touches them.
type ReplayBuffer struct {
	start  uint64 // offset of the first byte held
	end    uint64 // offset after the last byte held
	base   uint64 // offset of chunks[0][0]
	chunks []*[chunkSize]byte
	// spill, when not nil, holds the bytes instead of chunks (there are
	// none): (*spill)[i] is the byte at offset base+i. Compact makes it,
	// the next Tail moves it back into a chunk. Its bytes are never
	// written in place, so a writer may go on sending from a slice of it
	// after that. It is nil whenever the buffer is empty. A pointer: the
	// session, which holds two buffers, stays in a smaller size class.
	spill *[]byte
	// lent: a Tail is being filled outside the lock; its chunk must stay.
	lent bool
	// acct, if set, is charged for the chunks held (a memory budget
	// shared by sessions).
	acct *Budget
}

// Start is the offset of the oldest byte held.
func (b *ReplayBuffer) Start() uint64 { return b.start }

// End is the offset after the newest byte held.
func (b *ReplayBuffer) End() uint64 { return b.end }

// Len is the number of bytes held.
func (b *ReplayBuffer) Len() int { return int(b.end - b.start) }

// Drop empties the buffer without returning its chunks to the pool: a
// goroutine may still hold a slice of one (a link's reader filling the
// tail, a WriteTo writing from it). The garbage collector takes them.
func (b *ReplayBuffer) Drop() {
	b.acct.charge(-b.held())
	b.chunks, b.spill = nil, nil
	b.start = b.end
	b.base = b.end
}

// Write appends p.
func (b *ReplayBuffer) Write(p []byte) {
	for len(p) > 0 {
		t := b.Tail()
		n := copy(t, p)
		b.Commit(n)
		p = p[n:]
	}
}

// Tail returns the free space after End in the last chunk, adding a chunk
// if the last one is full. The caller may fill it without holding the
// session's lock, then Commit what it filled.
func (b *ReplayBuffer) Tail() []byte {
	if b.spill != nil {
		b.unspill()
	}
	if len(b.chunks) == 0 {
		b.base = b.end
	}
	used := int(b.end - b.base)
	if used == len(b.chunks)*chunkSize {
		b.chunks = append(b.chunks, chunkPool.Get().(*[chunkSize]byte))
		b.acct.charge(chunkSize)
	}
	c := b.chunks[used/chunkSize]
	b.lent = true
	return c[used%chunkSize:]
}

// Commit marks n bytes of the last Tail as held (n may be 0) and ends
// the loan.
func (b *ReplayBuffer) Commit(n int) {
	if n == 0 && b.lent && len(b.chunks) > 0 && int(b.end-b.base) == (len(b.chunks)-1)*chunkSize {
		// The loan took a chunk of its own and put nothing in it (a
		// read that found nothing): an idle session keeps no chunk.
		last := len(b.chunks) - 1
		chunkPool.Put(b.chunks[last])
		b.chunks[last] = nil
		b.chunks = b.chunks[:last]
		b.acct.charge(-chunkSize)
		if last == 0 {
			b.chunks = nil
			b.base = b.end
		}
	}
	b.end += uint64(n)
	b.lent = false
}

// Slices appends to dst slices covering [from, from+n) and returns it. The
// range must lie within [Start, End]. The slices alias the buffer.
func (b *ReplayBuffer) Slices(dst [][]byte, from uint64, n int) [][]byte {
	if b.spill != nil && n > 0 {
		rel := int(from - b.base)
		return append(dst, (*b.spill)[rel:rel+n])
	}
	for n > 0 {
		rel := int(from - b.base)
		c := b.chunks[rel/chunkSize][rel%chunkSize:]
		if len(c) > n {
			c = c[:n]
		}
		dst = append(dst, c)
		from += uint64(len(c))
		n -= len(c)
	}
	return dst
}

// Read copies bytes from Start into p and discards them.
func (b *ReplayBuffer) Read(p []byte) int {
	n := min(len(p), b.Len())
	if b.spill != nil {
		copy(p[:n], (*b.spill)[b.start-b.base:])
		b.Discard(b.start + uint64(n))
		return n
	}
	for done := 0; done < n; {
		rel := int(b.start - b.base)
		c := b.chunks[rel/chunkSize][rel%chunkSize:]
		k := copy(p[done:n], c)
		done += k
		b.Discard(b.start + uint64(k))
	}
	return n
}

// Discard drops the bytes below upto (clamped to [Start, End]) and returns
// whole chunks below the new Start to the pool.
func (b *ReplayBuffer) Discard(upto uint64) {
	if upto <= b.start {
		return
	}
	b.start = min(upto, b.end)
	if b.spill != nil {
		if b.start == b.end {
			b.acct.charge(-int64(cap(*b.spill)))
			b.spill = nil
			b.base = b.end
		}
		return
	}
	if b.start == b.end && !b.lent {
		// Empty: give back the partly used last chunk too, so that an
		// idle session holds no buffer at all.
		b.free(len(b.chunks))
		return
	}
	b.free(int(b.start-b.base) / chunkSize)
}

func (b *ReplayBuffer) free(n int) {
	n = min(n, len(b.chunks)) // after Drop, a late Commit may run ahead
	for i := 0; i < n; i++ {
		chunkPool.Put(b.chunks[i])
		b.chunks[i] = nil
	}
	b.acct.charge(-int64(n) * chunkSize)
	b.chunks = b.chunks[n:]
	b.base += uint64(n) * chunkSize
	if len(b.chunks) == 0 {
		b.chunks = nil // let an idle session drop the slice's array too
		b.base = b.end
	}
}

// Skip counts n bytes as held and consumed at once: bytes that went
// straight to their destination (a spliced DATA payload) without passing
// through the buffer. The buffer must be empty and no Tail being filled
// (a loan left by a reader that stopped, its link gone, is ended here).
func (b *ReplayBuffer) Skip(n int) {
	if b.Len() != 0 {
		panic("resume: Skip on a buffer that is not empty")
	}
	b.lent = false
	b.free(len(b.chunks))
	b.end += uint64(n)
	b.start, b.base = b.end, b.end
}

// PutBack makes the last n bytes before End held again, their content
// laid out from chunks[0][0]: the part of a Skip that did not reach its
// destination after all. The buffer must be empty, with no chunk and no
// loan; it takes the chunks.
func (b *ReplayBuffer) PutBack(chunks []*[chunkSize]byte, n int) {
	if b.Len() != 0 || len(b.chunks) != 0 || b.lent || n > len(chunks)*chunkSize || uint64(n) > b.end {
		panic("resume: PutBack on a buffer that is not empty")
	}
	b.chunks = chunks
	b.acct.charge(int64(len(chunks)) * chunkSize)
	b.start = b.end - uint64(n)
	b.base = b.start
}

// held is what the buffer's memory counts for in its Budget.
func (b *ReplayBuffer) held() int64 {
	n := int64(len(b.chunks)) * chunkSize
	if b.spill != nil {
		n += int64(cap(*b.spill))
	}
	return n
}

// Compact moves what the buffer holds, if it is at most compactMax bytes,
// out of its chunks into an allocation of its own size. A session calls it
// when its link is lost: it may stay parked for minutes with a few bytes
// unacknowledged. The chunks are left to the garbage collector, not the
// pool: the lost link's writer may still be sending from them. Nothing
// is done while a Tail is lent.
func (b *ReplayBuffer) Compact() {
	n := b.Len()
	if b.lent || b.spill != nil || len(b.chunks) == 0 || n > compactMax {
		return
	}
	was := b.held()
	if n > 0 {
		spill := make([]byte, n)
		at := 0
		for _, seg := range b.Slices(nil, b.start, n) {
			at += copy(spill[at:], seg)
		}
		b.spill = &spill
	}
	b.chunks = nil
	b.base = b.start
	b.acct.charge(b.held() - was)
}

// unspill moves the bytes of spill back into a chunk, for a Tail.
func (b *ReplayBuffer) unspill() {
	c := chunkPool.Get().(*[chunkSize]byte)
	copy(c[:], (*b.spill)[b.start-b.base:])
	b.acct.charge(chunkSize - int64(cap(*b.spill)))
	b.spill = nil
	b.chunks = append(b.chunks[:0], c)
	b.base = b.start
}
