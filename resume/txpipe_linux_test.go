package resume

import (
	"bytes"
	"math/rand/v2"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// sendContent is what Slices says the send side holds (moving piped bytes
// to memory).
func sendContent(t *sendSide) []byte {
	var out []byte
	for _, seg := range t.Slices(nil, t.Start(), t.Len()) {
		out = append(out, seg...)
	}
	return out
}

// teeInto puts p into a fresh pipe, as spliceIn would from a socket, and
// tees it into the send side's lent pipe: it returns how many bytes the
// pipe took (0 and no loan if the side lent none).
func teeInto(tb testing.TB, t *sendSide, p []byte) (m int, lent bool) {
	tb.Helper()
	src, err := getPipe()
	if err != nil {
		tb.Fatal(err)
	}
	defer src.close()
	if k, err := unix.Write(src.w, p); err != nil || k != len(p) {
		tb.Fatalf("write to pipe: %d, %v", k, err)
	}
	rp := t.lendPipe()
	if rp == nil {
		return 0, false
	}
	m, err = teePipe(src, rp, len(p))
	if err != nil {
		tb.Fatalf("tee: %v", err)
	}
	return m, true
}

// The send side against a model (a byte slice) through random tees into
// its pipes (kept or refused, chains of pipes included), copied writes, discards, compactions and
// reads of the piped bytes: the bytes held, their offsets and the budget's
// charge agree after every step, the pipe is used, and nothing stays open
// after Drop.
func TestSendPipeModel(t *testing.T) {
	closeIdlePipes()
	chained := 0
	for seed := range uint64(6) {
		r := rand.New(rand.NewPCG(seed, 11))
		acct := NewBudget(0)
		var s sendSide
		s.acct = acct
		var model []byte
		var start, end uint64
		piped, unpiped := 0, 0
		for step := range 600 {
			op := r.IntN(12)
			lagging := seed%2 == 1 // acknowledgements lag: chains form
			if lagging && op >= 9 && r.IntN(10) != 0 {
				op = 0
			}
			switch {
			case op < 5:
				p := stream(seed<<20|uint64(step), txBulkMin+r.IntN(48<<10))
				m, lent := teeInto(t, &s, p)
				if !lent {
					s.Write(p)
					model = append(model, p...)
					end += uint64(len(p))
					break
				}
				if m != len(p) {
					t.Fatalf("seed %d step %d: the lent pipe took %d of %d bytes", seed, step, m, len(p))
				}
				keep := r.IntN(10) != 0
				if dead := s.commitPipe(m, keep); dead {
					t.Fatalf("seed %d step %d: pipe dropped without a Drop", seed, step)
				}
				if keep {
					model = append(model, p...)
					end += uint64(len(p))
					piped++
				}
			case op < 6:
				p := stream(seed<<21|uint64(step), r.IntN(4<<10))
				s.Write(p)
				model = append(model, p...)
				end += uint64(len(p))
			case op < 9:
				k := r.IntN(len(model) + 1)
				if lagging {
					k = min(k, r.IntN(64<<10))
				}
				s.Discard(start + uint64(k))
				model = model[k:]
				start += uint64(k)
			case op < 10:
				if s.tx != nil && s.tx.n > 0 {
					unpiped++
				}
				if got := sendContent(&s); !bytes.Equal(got, model) {
					t.Fatalf("seed %d step %d: content differs at %d", seed, step, firstDiff(got, model))
				}
				if s.tx != nil {
					t.Fatalf("seed %d step %d: a pipe kept after its bytes were read back", seed, step)
				}
			case op < 11:
				s.Compact()
				if s.tx != nil {
					t.Fatalf("seed %d step %d: Compact kept the pipe", seed, step)
				}
			default:
				// A splice send lays out its frame: the piped bytes are
				// holes of the right length, and stay in the pipe.
				n := s.Len()
				s.hole = true
				segs := s.Slices(nil, s.Start(), n)
				s.hole = false
				total := 0
				for _, seg := range segs {
					total += len(seg)
				}
				if total != n {
					t.Fatalf("seed %d step %d: hole layout covers %d of %d bytes", seed, step, total, n)
				}
			}
			if s.Start() != start || s.End() != end || s.Len() != len(model) {
				t.Fatalf("seed %d step %d: [%d, %d) len %d held, want [%d, %d) len %d", seed, step, s.Start(), s.End(), s.Len(), start, end, len(model))
			}
			if want := s.ReplayBuffer.held() + int64(s.piped()); acct.InUse() != want {
				t.Fatalf("seed %d step %d: budget charged %d, side holds %d", seed, step, acct.InUse(), want)
			}
			if s.tx != nil && len(s.tx.segs) > 1 {
				chained++
			}
			if s.tx != nil && s.tx.n == 0 {
				t.Fatalf("seed %d step %d: an empty pipe kept", seed, step)
			}
		}
		if got := sendContent(&s); !bytes.Equal(got, model) {
			t.Fatalf("seed %d: final content differs at %d", seed, firstDiff(got, model))
		}
		if piped == 0 || unpiped == 0 {
			t.Fatalf("seed %d: %d tees kept, %d reads of piped bytes: the pipe was not exercised", seed, piped, unpiped)
		}
		m, _ := teeInto(t, &s, stream(seed, txBulkMin))
		s.commitPipe(m, true)
		end += uint64(m)
		s.Drop()
		if s.Start() != end || s.End() != end || s.tx != nil || acct.InUse() != 0 {
			t.Fatalf("seed %d: after Drop [%d, %d), pipe %v, %d charged; want [%d, %d), none, 0", seed, s.Start(), s.End(), s.tx != nil, acct.InUse(), end, end)
		}
	}
	if chained == 0 {
		t.Fatal("no step had a chain of pipes")
	}
	if open := closeIdlePipes(); open != 0 {
		t.Fatalf("%d pipes still open", open)
	}
}

// A Drop while a tee runs (the session closed meanwhile) leaves the pipe
// to the borrower, who learns it is dead and closes it; a refused tee
// behind kept bytes moves them to memory and closes the pipe with the
// refused ones: nothing of them is ever read as the stream's.
func TestSendPipeDropWhileLent(t *testing.T) {
	closeIdlePipes()
	var s sendSide
	a := stream(1, txBulkMin)
	m, _ := teeInto(t, &s, a)
	s.commitPipe(m, true)
	b := stream(2, txBulkMin)
	m, lent := teeInto(t, &s, b)
	if !lent || m != len(b) {
		t.Fatalf("second tee: %d bytes, lent %v", m, lent)
	}
	if dead := s.commitPipe(m, false); dead {
		t.Fatal("refused tee reported a dead pipe")
	}
	if s.tx != nil || !bytes.Equal(sendContent(&s), a) {
		t.Fatalf("after a refused tee: pipe %v, content equal %v", s.tx != nil, bytes.Equal(sendContent(&s), a))
	}
	m, lent = teeInto(t, &s, b)
	if !lent {
		t.Fatal("no pipe lent")
	}
	s.Drop()
	if s.tx == nil || !s.tx.dead {
		t.Fatal("Drop during a loan did not leave the pipe to the borrower")
	}
	if dead := s.commitPipe(m, true); !dead || s.tx != nil {
		t.Fatalf("borrower after Drop: dead %v, pipe %v", dead, s.tx != nil)
	}
	if s.Len() != 0 || s.End() != uint64(len(a)) {
		t.Fatalf("after Drop: len %d end %d, want 0 and %d", s.Len(), s.End(), len(a))
	}
	if open := closeIdlePipes(); open != 0 {
		t.Fatalf("%d pipes still open", open)
	}
}

// The send pipes of the process stay under maxTxPipePages: past it a send
// side lends no pipe (its bulk is copied), pipes given back or closed make
// room again, and the count returns to 0 when they are all closed.
func TestSendPipesStayUnderThePageCap(t *testing.T) {
	closeIdlePipes()
	defer func(old int) { maxTxPipePages = old }(maxTxPipePages)
	pages := txPipeSize / os.Getpagesize()
	maxTxPipePages = 2 * pages

	sides := make([]sendSide, 3)
	for i := range sides {
		sides[i].acct = NewBudget(0)
	}
	p0, p1 := sides[0].lendPipe(), sides[1].lendPipe()
	if p0 == nil || p1 == nil {
		t.Fatalf("the first two send sides got pipes %v, %v; want both", p0, p1)
	}
	if got := pipePool.txPages; got != 2*pages {
		t.Fatalf("txPages = %d with two pipes of %d pages, want %d", got, pages, 2*pages)
	}
	if p := sides[2].lendPipe(); p != nil {
		t.Fatalf("a third send side got a pipe past the cap of %d pages (%d in use)", maxTxPipePages, pipePool.txPages)
	}
	// The refused side copies: its bytes are all there.
	sides[2].Write([]byte("copied"))
	if got := string(sendContent(&sides[2])); got != "copied" {
		t.Fatalf("refused side holds %q, want %q", got, "copied")
	}
	// Bytes teed into side 0's pipe, then side 0 done with it: back in the
	// pool, it counts (it is open), and the next side reuses it.
	src, err := getPipe()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(src.w, []byte("piped")); err != nil {
		t.Fatal(err)
	}
	if m, err := teePipe(src, p0, 5); err != nil || m != 5 {
		t.Fatalf("tee: %d, %v", m, err)
	}
	src.close()
	if dead := sides[0].commitPipe(5, true); dead {
		t.Fatal("pipe dropped while nobody dropped it")
	}
	if got := string(sendContent(&sides[0])); got != "piped" {
		t.Fatalf("side 0 holds %q, want %q", got, "piped")
	}
	sides[0].Discard(sides[0].End()) // acknowledged: the empty pipe goes back
	if sides[0].tx != nil {
		t.Fatal("an empty, acknowledged send side still holds its pipe")
	}
	if p := sides[2].lendPipe(); p != p0 {
		t.Fatalf("after a pipe went back to the pool the third side got %v, want the pooled %v", p, p0)
	}
	sides[2].commitPipe(0, true)
	sides[1].commitPipe(0, true)
	if n := closeIdlePipes(); n != 0 {
		t.Fatalf("%d pipes still open after every send side gave its pipe back", n)
	}
	if got := pipePool.txPages; got != 0 {
		t.Fatalf("txPages = %d with no send pipe open, want 0", got)
	}
}
