package frame_test

import (
	"testing"

	"github.com/lifeline-proxy/lifeline/frame"
)

// The hot path of a link is encoding ACKs and DATA headers into a reused
// buffer and decoding a stream of DATA and control frames. All of it must
// run without allocating (TestZeroAlloc pins that outside benchmarks).

var sink []byte

func BenchmarkAppendAck(b *testing.B) {
	buf := make([]byte, 0, frame.HeaderLen+frame.AckLen)
	b.ReportAllocs()
	b.SetBytes(frame.HeaderLen + frame.AckLen)
	var i uint64
	for b.Loop() {
		i++
		buf = frame.AppendAck(buf[:0], frame.Ack{Received: i << 16, Window: i<<16 + 2<<20, Flags: uint8(i & frame.AckFin)})
	}
	sink = buf
}

func BenchmarkAppendDataHeader(b *testing.B) {
	buf := make([]byte, 0, frame.HeaderLen)
	b.ReportAllocs()
	b.SetBytes(frame.HeaderLen)
	n := 0
	for b.Loop() {
		n = n%frame.MaxPayload + 1
		buf = frame.AppendDataHeader(buf[:0], n)
	}
	sink = buf
}

// BenchmarkReaderData decodes an endless stream of full 64 KiB DATA frames
// into one reused buffer. The source replays a prepared stream without
// allocating, so what is measured is the Reader.
func BenchmarkReaderData(b *testing.B) {
	stream := append(frame.AppendDataHeader(nil, frame.MaxPayload), make([]byte, frame.MaxPayload)...)
	r := frame.NewReader(&loopReader{buf: stream}, 64<<10)
	dst := make([]byte, 32<<10)
	b.ReportAllocs()
	b.SetBytes(frame.MaxPayload)
	for b.Loop() {
		h, err := r.Next()
		if err != nil || h.Type != frame.TypeData {
			b.Fatalf("Next = %+v, %v", h, err)
		}
		for r.DataRemaining() > 0 {
			if _, err := r.ReadData(dst); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkReaderControl decodes an endless stream of ACK and PING frames:
// one op is one ACK and one PING, read and parsed.
func BenchmarkReaderControl(b *testing.B) {
	var stream []byte
	stream = frame.AppendAck(stream, frame.Ack{Received: 1 << 20, Window: 3 << 20, Flags: frame.AckFin})
	stream = frame.AppendU64(stream, frame.TypePing, 1732233600000000000)
	r := frame.NewReader(&loopReader{buf: stream}, 4096)
	b.ReportAllocs()
	b.SetBytes(int64(len(stream)))
	var sum uint64
	for b.Loop() {
		h, err := r.Next()
		if err != nil || h.Type != frame.TypeAck {
			b.Fatalf("Next = %+v, %v", h, err)
		}
		p, err := r.Payload(h)
		if err != nil {
			b.Fatal(err)
		}
		a, err := frame.ParseAck(p)
		if err != nil {
			b.Fatal(err)
		}
		h, err = r.Next()
		if err != nil || h.Type != frame.TypePing {
			b.Fatalf("Next = %+v, %v", h, err)
		}
		if p, err = r.Payload(h); err != nil {
			b.Fatal(err)
		}
		v, err := frame.ParseU64(p)
		if err != nil {
			b.Fatal(err)
		}
		sum += a.Window + v
	}
	if sum == 0 {
		b.Fatal("nothing decoded")
	}
}
