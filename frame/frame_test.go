package frame_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// The sizes below are written out as literals on purpose: they are the
// wire format, and a change to a constant in frame/ must break these tests.
const (
	wantHeaderLen  = 4
	wantAckLen     = 17
	wantU64Len     = 8
	wantHelloFixed = 41 // key 32 + timeout 4 + buffer 4 + routeLen 1
	wantWelcomeLen = 56 // session 16 + key 32 + timeout 4 + buffer 4
	wantResumeLen  = 105
	wantResumedLen = 89
	wantMaxPayload = 65536
	wantMaxReason  = 256
	wantMaxRoute   = 255
	wantMaxApp     = 255
	// HELLO's longest payload: the longest route, then the optional
	// application address at its longest (appLen 1 + 255).
	wantMaxHello = wantHelloFixed + wantMaxRoute + 1 + wantMaxApp
)

func TestConstants(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want int
	}{
		{"PreambleLen", frame.PreambleLen, 5},
		{"HeaderLen", frame.HeaderLen, wantHeaderLen},
		{"MaxPayload", frame.MaxPayload, wantMaxPayload},
		{"MaxReason", frame.MaxReason, wantMaxReason},
		{"MaxRoute", frame.MaxRoute, wantMaxRoute},
		{"MaxAppAddr", frame.MaxAppAddr, wantMaxApp},
		{"AckLen", frame.AckLen, wantAckLen},
		{"PingLen", frame.PingLen, wantU64Len},
		{"CloseWriteLen", frame.CloseWriteLen, wantU64Len},
		{"KeyLen", frame.KeyLen, 32},
		{"ProofLen", frame.ProofLen, 32},
		{"SessionIDLen", frame.SessionIDLen, 16},
		{"AckFin", frame.AckFin, 1},
		{"Version", int(frame.Version), 2},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
	if string(frame.Magic[:]) != "LFLN" {
		t.Errorf("Magic = %q, want LFLN", frame.Magic[:])
	}
}

// seq returns an n-byte array-like slice start, start+1, ...
func seq(start byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = start + byte(i)
	}
	return b
}

func key(start byte) (k [frame.KeyLen]byte)       { copy(k[:], seq(start, frame.KeyLen)); return }
func proof(start byte) (p [frame.ProofLen]byte)   { copy(p[:], seq(start, frame.ProofLen)); return }
func sid(start byte) (s [frame.SessionIDLen]byte) { copy(s[:], seq(start, frame.SessionIDLen)); return }

func noErr(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// must returns a function that unwraps an ([]byte, error) pair.
func must(t testing.TB) func([]byte, error) []byte {
	return func(b []byte, err error) []byte {
		t.Helper()
		noErr(t, err)
		return b
	}
}

func mustHello(t testing.TB, h *frame.Hello) []byte { return must(t)(frame.AppendHello(nil, h)) }

// unhex decodes hex, ignoring white space.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	return must(t)(hex.DecodeString(strings.Join(strings.Fields(s), "")))
}

// parseAny adapts a typed payload decoder for the tables.
func parseAny[T any](f func([]byte) (T, error)) func([]byte) (any, error) {
	return func(p []byte) (any, error) { return f(p) }
}

var (
	parseAck        = parseAny(frame.ParseAck)
	parseU64        = parseAny(frame.ParseU64)
	parseCodeReason = parseAny(frame.ParseCodeReason)
	parseGoAway     = parseAny(frame.ParseGoAway)
	parseReject     = parseAny(frame.ParseReject)
	parseHello      = parseAny(frame.ParseHello)
	parseWelcome    = parseAny(frame.ParseWelcome)
	parseResume     = parseAny(frame.ParseResume)
	parseResumed    = parseAny(frame.ParseResumed)
)

type msgCase struct {
	name  string
	enc   []byte // whole frame, header included
	typ   frame.Type
	parse func([]byte) (any, error)
	want  any
}

func messageCases(t testing.TB) []msgCase {
	longRoute := strings.Repeat("r", wantMaxRoute)
	maxReason := strings.Repeat("x", wantMaxReason)
	resume := &frame.Resume{SessionID: sid(0x10), Counter: 7, Key: key(0x40), Received: 1 << 40, Window: 1<<40 + 2<<20, Flags: frame.AckFin, Proof: proof(0x80)}
	resumed := &frame.Resumed{Key: key(0x60), Received: 12345, Window: 12345 + 65536, Flags: 0, Proof: proof(0xa0)}
	return []msgCase{
		{"ack zero", frame.AppendAck(nil, frame.Ack{}), frame.TypeAck, parseAck, frame.Ack{}},
		{"ack fin", frame.AppendAck(nil, frame.Ack{Received: 1, Window: 2, Flags: frame.AckFin}), frame.TypeAck, parseAck, frame.Ack{Received: 1, Window: 2, Flags: frame.AckFin}},
		{"ack max", frame.AppendAck(nil, frame.Ack{Received: ^uint64(0), Window: ^uint64(0)}), frame.TypeAck, parseAck, frame.Ack{Received: ^uint64(0), Window: ^uint64(0)}},
		{"ping", frame.AppendU64(nil, frame.TypePing, 0x0123456789abcdef), frame.TypePing, parseU64, uint64(0x0123456789abcdef)},
		{"pong", frame.AppendU64(nil, frame.TypePong, 0), frame.TypePong, parseU64, uint64(0)},
		{"close_write", frame.AppendU64(nil, frame.TypeCloseWrite, ^uint64(0)), frame.TypeCloseWrite, parseU64, ^uint64(0)},
		{"reset none", frame.AppendCodeReason(nil, frame.TypeReset, frame.CodeNone, ""), frame.TypeReset, parseCodeReason, frame.CodeReason{}},
		{"reset max reason", frame.AppendCodeReason(nil, frame.TypeReset, frame.CodeBufferLost, maxReason), frame.TypeReset, parseCodeReason, frame.CodeReason{Code: frame.CodeBufferLost, Reason: maxReason}},
		{"goaway", must(t)(frame.AppendGoAway(nil, frame.GoAway{Code: frame.CodeShuttingDown, Reason: "draining"})), frame.TypeGoAway, parseGoAway, frame.GoAway{Code: frame.CodeShuttingDown, Reason: "draining"}},
		{"goaway to", must(t)(frame.AppendGoAway(nil, frame.GoAway{Addr: "gw2.example.net:7000", Reason: "moving"})), frame.TypeGoAway, parseGoAway, frame.GoAway{Addr: "gw2.example.net:7000", Reason: "moving"}},
		{"goaway max", must(t)(frame.AppendGoAway(nil, frame.GoAway{Addr: strings.Repeat("a", 255), Reason: maxReason})), frame.TypeGoAway, parseGoAway, frame.GoAway{Addr: strings.Repeat("a", 255), Reason: maxReason}},
		{"reject unknown code", frame.AppendReject(nil, frame.Reject{Code: frame.Code(0xffff), Reason: "é\x00\xff"}), frame.TypeReject, parseReject, frame.Reject{Code: 0xffff, Reason: "é\x00\xff"}},
		{"reject throttled", frame.AppendReject(nil, frame.Reject{Code: frame.CodeThrottled, RetryAfter: 1500 * time.Millisecond, Reason: "busy"}), frame.TypeReject, parseReject, frame.Reject{Code: frame.CodeThrottled, RetryAfter: 1500 * time.Millisecond, Reason: "busy"}},
		{"reject throttled max", frame.AppendReject(nil, frame.Reject{Code: frame.CodeThrottled, Reason: maxReason}), frame.TypeReject, parseReject, frame.Reject{Code: frame.CodeThrottled, Reason: maxReason}},
		{"hello", mustHello(t, &frame.Hello{Key: key(1), ReconnectTimeout: 60000, Buffer: 2 << 20, Route: "db"}), frame.TypeHello, parseHello, &frame.Hello{Key: key(1), ReconnectTimeout: 60000, Buffer: 2 << 20, Route: "db"}},
		{"hello empty route", mustHello(t, &frame.Hello{}), frame.TypeHello, parseHello, &frame.Hello{}},
		{"hello app", mustHello(t, &frame.Hello{Key: key(2), ReconnectTimeout: 60000, Buffer: 2 << 20, Route: "db", App: "10.1.2.3:54321"}), frame.TypeHello, parseHello, &frame.Hello{Key: key(2), ReconnectTimeout: 60000, Buffer: 2 << 20, Route: "db", App: "10.1.2.3:54321"}},
		{"hello app empty route", mustHello(t, &frame.Hello{App: "[2001:db8::1]:80"}), frame.TypeHello, parseHello, &frame.Hello{App: "[2001:db8::1]:80"}},
		{"hello max route and app", mustHello(t, &frame.Hello{Route: longRoute, App: strings.Repeat("a", wantMaxApp)}), frame.TypeHello, parseHello, &frame.Hello{Route: longRoute, App: strings.Repeat("a", wantMaxApp)}},
		{"hello max route", mustHello(t, &frame.Hello{Key: key(9), ReconnectTimeout: ^uint32(0), Buffer: ^uint32(0), Route: longRoute}), frame.TypeHello, parseHello, &frame.Hello{Key: key(9), ReconnectTimeout: ^uint32(0), Buffer: ^uint32(0), Route: longRoute}},
		{"welcome", frame.AppendWelcome(nil, &frame.Welcome{SessionID: sid(0xf0), Key: key(0x30), ReconnectTimeout: 0, Buffer: 65536}), frame.TypeWelcome, parseWelcome, &frame.Welcome{SessionID: sid(0xf0), Key: key(0x30), ReconnectTimeout: 0, Buffer: 65536}},
		{"resume", frame.AppendResume(nil, resume), frame.TypeResume, parseResume, resume},
		{"resume zero", frame.AppendResume(nil, &frame.Resume{}), frame.TypeResume, parseResume, &frame.Resume{}},
		{"resumed", frame.AppendResumed(nil, resumed), frame.TypeResumed, parseResumed, resumed},
		{"resumed fin", frame.AppendResumed(nil, &frame.Resumed{Flags: frame.AckFin}), frame.TypeResumed, parseResumed, &frame.Resumed{Flags: frame.AckFin}},
	}
}

// TestRoundTrip encodes every message type, then decodes the header and the
// payload and compares with what was encoded.
func TestRoundTrip(t *testing.T) {
	for _, c := range messageCases(t) {
		t.Run(c.name, func(t *testing.T) {
			h, err := frame.ParseHeader(c.enc)
			if err != nil {
				t.Fatalf("ParseHeader(%x): %v", c.enc[:4], err)
			}
			if h.Type != c.typ {
				t.Errorf("type %v, want %v", h.Type, c.typ)
			}
			if h.Len != len(c.enc)-wantHeaderLen {
				t.Errorf("header length %d, frame has %d payload bytes", h.Len, len(c.enc)-wantHeaderLen)
			}
			if h.Type.Handshake() != (c.typ >= 0x10) {
				t.Errorf("%v.Handshake() = %v", h.Type, h.Type.Handshake())
			}
			got, err := c.parse(c.enc[wantHeaderLen:])
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Errorf("parsed %+v, want %+v", got, c.want)
			}
			// Appending to a non-empty slice keeps the prefix.
			prefix := []byte("prefix")
			if again := reencode(t, append([]byte(nil), prefix...), c.typ, got); !bytes.Equal(again, append(prefix, c.enc...)) {
				t.Errorf("re-encoding after a prefix:\n got %x\nwant %x", again, append(prefix, c.enc...))
			}
		})
	}
}

// reencode appends the frame of type typ carrying the parsed value v.
func reencode(t testing.TB, b []byte, typ frame.Type, v any) []byte {
	t.Helper()
	switch v := v.(type) {
	case frame.Ack:
		return frame.AppendAck(b, v)
	case uint64:
		return frame.AppendU64(b, typ, v)
	case frame.CodeReason:
		return frame.AppendCodeReason(b, typ, v.Code, v.Reason)
	case frame.GoAway:
		return must(t)(frame.AppendGoAway(b, v))
	case frame.Reject:
		return frame.AppendReject(b, v)
	case *frame.Hello:
		return must(t)(frame.AppendHello(b, v))
	case *frame.Welcome:
		return frame.AppendWelcome(b, v)
	case *frame.Resume:
		return frame.AppendResume(b, v)
	case *frame.Resumed:
		return frame.AppendResumed(b, v)
	}
	t.Fatalf("reencode: unexpected %T", v)
	return nil
}

// TestReaderStream writes a preamble and every frame type, including DATA,
// into one stream and reads it back through a Reader with the smallest
// read-ahead buffer and a source that returns one byte per Read.
func TestReaderStream(t *testing.T) {
	cases := messageCases(t)
	data := seq(0, 1000)
	maxData := bytes.Repeat([]byte{0x5a}, wantMaxPayload)
	var stream []byte
	stream = frame.AppendPreamble(stream)
	for i, c := range cases {
		stream = append(stream, c.enc...)
		if i == 3 {
			stream = append(frame.AppendDataHeader(stream, len(data)), data...)
		}
	}
	stream = append(frame.AppendDataHeader(stream, len(maxData)), maxData...)
	stream = append(frame.AppendDataHeader(stream, 1), 0xee)

	for _, src := range []struct {
		name string
		r    func() io.Reader
	}{
		{"bytes", func() io.Reader { return bytes.NewReader(stream) }},
		{"one byte reads", func() io.Reader { return iotest.OneByteReader(bytes.NewReader(stream)) }},
		{"half reads", func() io.Reader { return iotest.HalfReader(bytes.NewReader(stream)) }},
		{"data err at end", func() io.Reader { return iotest.DataErrReader(bytes.NewReader(stream)) }},
	} {
		for _, size := range []int{16, 4096, 1 << 17} {
			r := frame.NewReader(src.r(), size)
			v, err := r.ReadPreamble()
			if err != nil || v != frame.Version {
				t.Fatalf("%s/%d: ReadPreamble = %d, %v", src.name, size, v, err)
			}
			var datas [][]byte
			ci := 0
			for {
				h, err := r.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("%s/%d: Next: %v", src.name, size, err)
				}
				if h.Type == frame.TypeData {
					p := make([]byte, h.Len)
					n, err := r.ReadData(p)
					if n != h.Len || err != nil {
						t.Fatalf("%s/%d: ReadData = %d, %v; want %d", src.name, size, n, err, h.Len)
					}
					datas = append(datas, p)
					continue
				}
				c := cases[ci]
				ci++
				if h.Type != c.typ {
					t.Fatalf("%s/%d: frame %d is %v, want %v", src.name, size, ci, h.Type, c.typ)
				}
				p, err := r.Payload(h)
				if err != nil {
					t.Fatalf("%s/%d: Payload: %v", src.name, size, err)
				}
				if !bytes.Equal(p, c.enc[wantHeaderLen:]) {
					t.Fatalf("%s/%d: %s payload %x, want %x", src.name, size, c.name, p, c.enc[wantHeaderLen:])
				}
				got, err := c.parse(p)
				if err != nil || !reflect.DeepEqual(got, c.want) {
					t.Fatalf("%s/%d: %s parsed %+v, %v", src.name, size, c.name, got, err)
				}
			}
			if ci != len(cases) {
				t.Errorf("%s/%d: read %d control frames, want %d", src.name, size, ci, len(cases))
			}
			if len(datas) != 3 || !bytes.Equal(datas[0], data) || !bytes.Equal(datas[1], maxData) || !bytes.Equal(datas[2], []byte{0xee}) {
				t.Errorf("%s/%d: DATA payloads differ (%d frames)", src.name, size, len(datas))
			}
		}
	}
}

// TestGolden pins exact byte layouts. The expected bytes are written by
// hand from docs/protocol.md, not produced by the encoder.
func TestGolden(t *testing.T) {
	k1 := strings.Repeat("aa", 32)
	tests := []struct {
		name string
		got  []byte
		want string
	}{
		{"preamble", frame.AppendPreamble(nil), "4c464c4e 02"},
		{"data header 5", frame.AppendDataHeader(nil, 5), "01 000005"},
		{"data header max", frame.AppendDataHeader(nil, wantMaxPayload), "01 010000"},
		{"ack", frame.AppendAck(nil, frame.Ack{Received: 0x0102030405060708, Window: 0x1112131415161718, Flags: frame.AckFin}),
			"02 000011 0102030405060708 1112131415161718 01"},
		{"ping", frame.AppendU64(nil, frame.TypePing, 0xdeadbeef), "03 000008 00000000deadbeef"},
		{"pong", frame.AppendU64(nil, frame.TypePong, 0x1122334455667788), "04 000008 1122334455667788"},
		{"close_write", frame.AppendU64(nil, frame.TypeCloseWrite, 1<<20), "05 000008 0000000000100000"},
		{"reset", frame.AppendCodeReason(nil, frame.TypeReset, frame.CodeBufferLost, "gone"), "06 000006 0007 676f6e65"},
		{"goaway", must(t)(frame.AppendGoAway(nil, frame.GoAway{Code: frame.CodeShuttingDown})), "07 000003 0009 00"},
		{"goaway to", must(t)(frame.AppendGoAway(nil, frame.GoAway{Addr: "h:1", Reason: "x"})), "07 000007 0000 03 683a31 78"},
		{"reject throttled", frame.AppendReject(nil, frame.Reject{Code: frame.CodeThrottled, RetryAfter: 1500 * time.Millisecond, Reason: "x"}), "14 000007 0004 000005dc 78"},
		{"reject", frame.AppendCodeReason(nil, frame.TypeReject, frame.CodeAccessDenied, "no"), "14 000004 0001 6e6f"},
		{"hello", mustHello(t, &frame.Hello{Key: [32]byte(unhex(t, k1)), ReconnectTimeout: 60000, Buffer: 2 << 20, Route: "db"}),
			"10 00002b" + k1 + "0000ea60 00200000 02 6462"},
		{"welcome", frame.AppendWelcome(nil, &frame.Welcome{SessionID: sid(0), Key: key(0x20), ReconnectTimeout: 30000, Buffer: 0x01020304}),
			"11 000038 000102030405060708090a0b0c0d0e0f" +
				"202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f" +
				"00007530 01020304"},
		{"resume", frame.AppendResume(nil, &frame.Resume{SessionID: sid(0), Counter: 2, Key: key(0x20), Received: 0x100, Window: 0x200100, Flags: frame.AckFin, Proof: proof(0xc0)}),
			"12 000069 000102030405060708090a0b0c0d0e0f 0000000000000002" +
				"202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f" +
				"0000000000000100 0000000000200100 01" +
				"c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"},
		{"resumed", frame.AppendResumed(nil, &frame.Resumed{Key: key(0x20), Received: 0x10, Window: 0x20, Flags: 0, Resend: 0x30, Proof: proof(0xc0)}),
			"13 000059 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f" +
				"0000000000000010 0000000000000020 00 0000000000000030" +
				"c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"},
	}
	for _, tc := range tests {
		if want := unhex(t, tc.want); !bytes.Equal(tc.got, want) {
			t.Errorf("%s:\n got %x\nwant %x", tc.name, tc.got, want)
		}
	}

	var hdr [4]byte
	frame.PutHeader(hdr[:], frame.TypeHello, 0xabcdef)
	if want := unhex(t, "10abcdef"); !bytes.Equal(hdr[:], want) {
		t.Errorf("PutHeader = %x, want %x", hdr, want)
	}
}

func TestSigned(t *testing.T) {
	r := &frame.Resume{SessionID: sid(0), Counter: 9, Key: key(0x20), Received: 3, Window: 4, Flags: 1, Proof: proof(0xc0)}
	enc := frame.AppendResume(nil, r)
	if s := r.Signed(); len(s) != wantResumeLen-32 || !bytes.Equal(s, enc[4:4+wantResumeLen-32]) {
		t.Errorf("Resume.Signed = %x, want the payload without proof %x", s, enc[4:4+wantResumeLen-32])
	}
	d := &frame.Resumed{Key: key(0x20), Received: 3, Window: 4, Flags: 1, Proof: proof(0xc0)}
	enc = frame.AppendResumed(nil, d)
	if s := d.Signed(); len(s) != wantResumedLen-32 || !bytes.Equal(s, enc[4:4+wantResumedLen-32]) {
		t.Errorf("Resumed.Signed = %x, want the payload without proof %x", s, enc[4:4+wantResumedLen-32])
	}
}

// TestHeaderBounds checks every type at one below its minimum, the
// minimum, the maximum and one above.
func TestHeaderBounds(t *testing.T) {
	bounds := []struct {
		typ    frame.Type
		lo, hi int
	}{
		{frame.TypeData, 1, wantMaxPayload},
		{frame.TypeAck, wantAckLen, wantAckLen},
		{frame.TypePing, 8, 8},
		{frame.TypePong, 8, 8},
		{frame.TypeCloseWrite, 8, 8},
		{frame.TypeReset, 2, 2 + wantMaxReason},
		{frame.TypeGoAway, 3, 3 + 255 + wantMaxReason},
		{frame.TypeReject, 2, 2 + 4 + wantMaxReason},
		{frame.TypeHello, wantHelloFixed, wantMaxHello},
		{frame.TypeWelcome, wantWelcomeLen, wantWelcomeLen},
		{frame.TypeResume, wantResumeLen, wantResumeLen},
		{frame.TypeResumed, wantResumedLen, wantResumedLen},
	}
	for _, b := range bounds {
		for _, tc := range []struct {
			n  int
			ok bool
		}{
			{0, b.lo == 0},
			{b.lo - 1, false},
			{b.lo, true},
			{b.hi, true},
			{b.hi + 1, false},
			{0xffffff, false},
		} {
			if tc.n < 0 {
				continue
			}
			var hdr [4]byte
			frame.PutHeader(hdr[:], b.typ, tc.n)
			h, err := frame.ParseHeader(hdr[:])
			if tc.ok {
				if err != nil || h.Type != b.typ || h.Len != tc.n {
					t.Errorf("%v len %d: got %+v, %v; want accepted", b.typ, tc.n, h, err)
				}
				continue
			}
			if !errors.Is(err, frame.ErrLength) || !errors.Is(err, frame.ErrMalformed) {
				t.Errorf("%v len %d: err %v, want ErrLength", b.typ, tc.n, err)
			}
		}
	}
}

func TestHeaderInvalid(t *testing.T) {
	known := map[byte]bool{1: true, 2: true, 3: true, 4: true, 5: true, 6: true, 7: true, 0x10: true, 0x11: true, 0x12: true, 0x13: true, 0x14: true}
	for ty := 0; ty < 256; ty++ {
		if known[byte(ty)] {
			continue
		}
		_, err := frame.ParseHeader([]byte{byte(ty), 0, 0, 8})
		if !errors.Is(err, frame.ErrUnknownType) || !errors.Is(err, frame.ErrMalformed) {
			t.Errorf("type 0x%02x: err %v, want ErrUnknownType", ty, err)
		}
	}
	for n := 0; n < wantHeaderLen; n++ {
		if _, err := frame.ParseHeader([]byte{1, 0, 0, 1}[:n]); !errors.Is(err, frame.ErrLength) {
			t.Errorf("%d-byte header: err %v, want ErrLength", n, err)
		}
	}
	// Extra bytes after the header are ignored by ParseHeader.
	if h, err := frame.ParseHeader([]byte{2, 0, 0, 17, 9, 9}); err != nil || h != (frame.Header{Type: frame.TypeAck, Len: 17}) {
		t.Errorf("header with trailing bytes: %+v, %v", h, err)
	}
}

// TestPayloadBounds feeds every payload decoder one byte too few and one
// byte too many.
func TestPayloadBounds(t *testing.T) {
	hello := mustHello(t, &frame.Hello{Route: "ab"})[4:]
	for _, tc := range []struct {
		name  string
		parse func([]byte) (any, error)
		lo    int
		hi    int
	}{
		{"ack", parseAck, wantAckLen, wantAckLen},
		{"u64", parseU64, 8, 8},
		{"code reason", parseCodeReason, 2, 2 + wantMaxReason},
		{"welcome", parseWelcome, wantWelcomeLen, wantWelcomeLen},
		{"resume", parseResume, wantResumeLen, wantResumeLen},
		{"resumed", parseResumed, wantResumedLen, wantResumedLen},
	} {
		for _, n := range []int{0, tc.lo - 1, tc.lo, tc.hi, tc.hi + 1, 1000} {
			if n < 0 {
				continue
			}
			_, err := tc.parse(make([]byte, n))
			if ok := n >= tc.lo && n <= tc.hi; ok {
				if err != nil {
					t.Errorf("%s with %d bytes: %v", tc.name, n, err)
				}
			} else if !errors.Is(err, frame.ErrLength) || !errors.Is(err, frame.ErrMalformed) {
				t.Errorf("%s with %d bytes: err %v, want ErrLength", tc.name, n, err)
			}
		}
	}

	// HELLO: fixed part too short, and route length disagreeing with the payload.
	for _, tc := range []struct {
		name string
		p    []byte
	}{
		{"empty", nil},
		{"fixed minus one", make([]byte, wantHelloFixed-1)},
		{"route byte says 1, none follow", append(make([]byte, wantHelloFixed-1), 1)},
		{"route byte says 0, one follows", append(make([]byte, wantHelloFixed), 'x')},
		{"one route byte missing", hello[:len(hello)-1]},
		{"one route byte extra", append(append([]byte(nil), hello...), 'c')},
		{"route byte says 255, 254 follow", append(append(make([]byte, wantHelloFixed-1), 255), make([]byte, 254)...)},
	} {
		if h, err := frame.ParseHello(tc.p); !errors.Is(err, frame.ErrLength) || h != nil {
			t.Errorf("HELLO %s: %+v, %v; want ErrLength", tc.name, h, err)
		}
	}
	if h, err := frame.ParseHello(hello); err != nil || h.Route != "ab" {
		t.Errorf("HELLO ab: %+v, %v", h, err)
	}
}

func TestUnknownFlags(t *testing.T) {
	ack := frame.AppendAck(nil, frame.Ack{Received: 5, Window: 6})[4:]
	resume := frame.AppendResume(nil, &frame.Resume{Counter: 1})[4:]
	resumed := frame.AppendResumed(nil, &frame.Resumed{Received: 1})[4:]
	for _, tc := range []struct {
		name  string
		p     []byte
		at    int
		parse func([]byte) (any, error)
	}{
		{"ACK", ack, 16, parseAck},
		{"RESUME", resume, 72, parseResume},
		{"RESUMED", resumed, 48, parseResumed},
	} {
		for flags := 0; flags < 256; flags++ {
			p := append([]byte(nil), tc.p...)
			p[tc.at] = byte(flags)
			v, err := tc.parse(p)
			if flags <= frame.AckFin {
				if err != nil {
					t.Errorf("%s flags 0x%02x: %v", tc.name, flags, err)
				}
				continue
			}
			if err == nil || !errors.Is(err, frame.ErrMalformed) {
				t.Errorf("%s flags 0x%02x: %+v, %v; want ErrMalformed", tc.name, flags, v, err)
			}
		}
	}
}

func TestReasonTruncation(t *testing.T) {
	for _, tc := range []struct {
		name   string
		reason string
		want   string
	}{
		{"empty", "", ""},
		{"short", "bye", "bye"},
		{"max", strings.Repeat("a", wantMaxReason), strings.Repeat("a", wantMaxReason)},
		{"max+1", strings.Repeat("b", wantMaxReason) + "X", strings.Repeat("b", wantMaxReason)},
		{"long", strings.Repeat("c", 10000), strings.Repeat("c", wantMaxReason)},
		// 255 ASCII bytes then a two-byte rune: cut inside the rune, at byte 256.
		{"cut rune", strings.Repeat("d", 255) + "é", strings.Repeat("d", 255) + "\xc3"},
	} {
		for _, typ := range []frame.Type{frame.TypeReset, frame.TypeReject} {
			enc := frame.AppendCodeReason(nil, typ, frame.CodeTimeout, tc.reason)
			if len(enc) != wantHeaderLen+2+len(tc.want) {
				t.Errorf("%s/%v: %d bytes, want %d", tc.name, typ, len(enc), wantHeaderLen+2+len(tc.want))
			}
			h, err := frame.ParseHeader(enc)
			if err != nil || h.Type != typ || h.Len != len(enc)-wantHeaderLen {
				t.Errorf("%s/%v: header %+v, %v", tc.name, typ, h, err)
				continue
			}
			cr, err := frame.ParseCodeReason(enc[wantHeaderLen:])
			if err != nil || cr.Code != frame.CodeTimeout || cr.Reason != tc.want {
				t.Errorf("%s/%v: parsed %+v, %v; want reason %q", tc.name, typ, cr, err, tc.want)
			}
		}
	}
}

func TestRouteTooLong(t *testing.T) {
	prefix := []byte("keep")
	for _, n := range []int{wantMaxRoute + 1, 1000} {
		b, err := frame.AppendHello(append([]byte(nil), prefix...), &frame.Hello{Route: strings.Repeat("r", n)})
		if !errors.Is(err, frame.ErrMalformed) {
			t.Errorf("route of %d bytes: err %v, want ErrMalformed", n, err)
		}
		if !bytes.Equal(b, prefix) {
			t.Errorf("route of %d bytes: buffer changed to %q", n, b)
		}
	}
	b, err := frame.AppendHello(nil, &frame.Hello{Route: strings.Repeat("r", wantMaxRoute)})
	if err != nil || len(b) != wantHeaderLen+wantHelloFixed+wantMaxRoute {
		t.Errorf("route of %d bytes: %d bytes, %v", wantMaxRoute, len(b), err)
	}
	for _, n := range []int{wantMaxApp + 1, 1000} {
		b, err := frame.AppendHello(append([]byte(nil), prefix...), &frame.Hello{App: strings.Repeat("a", n)})
		if !errors.Is(err, frame.ErrMalformed) || !bytes.Equal(b, prefix) {
			t.Errorf("application address of %d bytes: %q, %v; want ErrMalformed and the buffer unchanged", n, b, err)
		}
	}
}

// HELLO's optional application address: absent, or exactly appLen (1..255)
// bytes after the route; anything else is a length error.
func TestHelloAppAddr(t *testing.T) {
	base := mustHello(t, &frame.Hello{Route: "db"})[wantHeaderLen:]
	for _, tc := range []struct {
		name string
		tail []byte
		app  string // "" with ok: absent
		ok   bool
	}{
		{"absent", nil, "", true},
		{"one byte", []byte{1, 'x'}, "x", true},
		{"address", append([]byte{14}, "10.1.2.3:54321"...), "10.1.2.3:54321", true},
		{"zero length", []byte{0}, "", false},
		{"short", append([]byte{15}, "10.1.2.3:54321"...), "", false},
		{"long", append([]byte{13}, "10.1.2.3:54321"...), "", false},
		{"length only", []byte{5}, "", false},
		{"trailing after app", append([]byte{1, 'x'}, 0), "", false},
	} {
		p := append(append([]byte(nil), base...), tc.tail...)
		h, err := frame.ParseHello(p)
		if !tc.ok {
			if !errors.Is(err, frame.ErrLength) || h != nil {
				t.Errorf("%s: %+v, %v; want ErrLength", tc.name, h, err)
			}
			continue
		}
		if err != nil || h.Route != "db" || h.App != tc.app {
			t.Errorf("%s: %+v, %v; want route db, app %q", tc.name, h, err, tc.app)
		}
	}
	// A route length past the payload is still refused.
	bad := append([]byte(nil), base...)
	bad[wantHelloFixed-1] = 3
	if _, err := frame.ParseHello(bad); !errors.Is(err, frame.ErrLength) {
		t.Errorf("route length past the end: %v, want ErrLength", err)
	}
}

func TestPreamble(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		version byte
		err     error
	}{
		{"ok", "LFLN\x01", 1, nil},
		{"ok with trailing", "LFLN\x01\x10\x00", 1, nil},
		{"other version", "LFLN\x02", 2, nil},
		{"version zero", "LFLN\x00", 0, nil},
		{"lower case", "lfln\x01", 0, frame.ErrBadMagic},
		{"http", "GET / HTTP/1.1\r\n", 0, frame.ErrBadMagic},
		{"tls", "\x16\x03\x01\x02\x00", 0, frame.ErrBadMagic},
		{"one off", "LFLM\x01", 0, frame.ErrBadMagic},
		{"short", "LFLN", 0, frame.ErrBadMagic},
		{"empty", "", 0, frame.ErrBadMagic},
	} {
		v, err := frame.ParsePreamble([]byte(tc.in))
		if v != tc.version || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
			t.Errorf("ParsePreamble(%q) = %d, %v; want %d, %v", tc.in, v, err, tc.version, tc.err)
		}
		if len(tc.in) < frame.PreambleLen {
			continue
		}
		v, err = frame.NewReader(strings.NewReader(tc.in), 16).ReadPreamble()
		if v != tc.version || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
			t.Errorf("ReadPreamble(%q) = %d, %v; want %d, %v", tc.in, v, err, tc.version, tc.err)
		}
	}
	// A link that ends before the preamble is complete did not end cleanly.
	for n := 0; n < frame.PreambleLen; n++ {
		if _, err := frame.NewReader(strings.NewReader("LFLN\x01"[:n]), 16).ReadPreamble(); err != io.ErrUnexpectedEOF {
			t.Errorf("ReadPreamble of %d bytes: err %v, want io.ErrUnexpectedEOF", n, err)
		}
	}
}

// TestReaderTruncated cuts a stream at every interesting point: a clean end
// is io.EOF only between frames, anything else is io.ErrUnexpectedEOF.
func TestReaderTruncated(t *testing.T) {
	ack := frame.AppendAck(nil, frame.Ack{Received: 1, Window: 2})
	data := append(frame.AppendDataHeader(nil, 10), seq(0, 10)...)
	hello := mustHello(t, &frame.Hello{Route: "svc"})

	for _, full := range [][]byte{ack, data, hello} {
		for cut := 0; cut < len(full); cut++ {
			r := frame.NewReader(bytes.NewReader(full[:cut]), 16)
			h, err := r.Next()
			switch {
			case cut == 0:
				if err != io.EOF {
					t.Errorf("%x cut at 0: Next err %v, want io.EOF", full[:4], err)
				}
				continue
			case cut < wantHeaderLen:
				if err != io.ErrUnexpectedEOF {
					t.Errorf("%x cut at %d: Next err %v, want io.ErrUnexpectedEOF", full[:4], cut, err)
				}
				continue
			case err != nil:
				t.Errorf("%x cut at %d: Next err %v", full[:4], cut, err)
				continue
			}
			if h.Type != frame.TypeData {
				if _, err := r.Payload(h); err != io.ErrUnexpectedEOF {
					t.Errorf("%v cut at %d: Payload err %v, want io.ErrUnexpectedEOF", h.Type, cut, err)
				}
				continue
			}
			buf := make([]byte, 64)
			n, err := r.ReadData(buf)
			if want := cut - wantHeaderLen; n != want || err != io.ErrUnexpectedEOF {
				t.Errorf("DATA cut at %d: ReadData = %d, %v; want %d, io.ErrUnexpectedEOF", cut, n, err, want)
			}
			if !bytes.Equal(buf[:n], full[wantHeaderLen:cut]) {
				t.Errorf("DATA cut at %d: read %x", cut, buf[:n])
			}
			if r.DataRemaining() != h.Len-n {
				t.Errorf("DATA cut at %d: DataRemaining %d, want %d", cut, r.DataRemaining(), h.Len-n)
			}
		}
		// The whole frame followed by EOF: the frame reads, then io.EOF.
		r := frame.NewReader(bytes.NewReader(full), 16)
		h, err := r.Next()
		noErr(t, err)
		if h.Type == frame.TypeData {
			_, err = r.ReadData(make([]byte, h.Len))
		} else {
			_, err = r.Payload(h)
		}
		noErr(t, err)
		if _, err := r.Next(); err != io.EOF {
			t.Errorf("%v then EOF: Next err %v, want io.EOF", h.Type, err)
		}
	}

	// Other read errors pass through unchanged.
	boom := errors.New("boom")
	r := frame.NewReader(iotest.ErrReader(boom), 16)
	if _, err := r.Next(); err != boom {
		t.Errorf("Next on a failing reader: %v, want %v", err, boom)
	}
	r = frame.NewReader(io.MultiReader(bytes.NewReader(data[:6]), iotest.ErrReader(boom)), 16)
	if _, err := r.Next(); err != nil {
		t.Fatal(err)
	}
	if n, err := r.ReadData(make([]byte, 10)); n != 2 || err != boom {
		t.Errorf("ReadData on a failing reader: %d, %v; want 2, %v", n, err, boom)
	}
}

// TestReaderDataPartial reads one DATA payload over several ReadData calls
// of various sizes and checks that Next refuses while bytes are unread and
// that the frame after it is intact.
func TestReaderDataPartial(t *testing.T) {
	payload := seq(3, 1000)
	var stream []byte
	stream = append(frame.AppendDataHeader(stream, len(payload)), payload...)
	stream = frame.AppendU64(stream, frame.TypePing, 42)
	stream = append(frame.AppendDataHeader(stream, 2), 'h', 'i')

	for _, tc := range []struct {
		name   string
		chunks []int
	}{
		{"one call", []int{1000}},
		{"larger buffer", []int{5000}},
		{"bytes", []int{1, 1, 1, 997}},
		{"uneven", []int{7, 100, 0, 393, 1, 499}},
		{"many small", func() []int {
			c := make([]int, 100)
			for i := range c {
				c[i] = 10
			}
			return c
		}()},
		{"past end", []int{999, 64}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := frame.NewReader(iotest.HalfReader(bytes.NewReader(stream)), 16)
			h, err := r.Next()
			if err != nil || h != (frame.Header{Type: frame.TypeData, Len: len(payload)}) {
				t.Fatalf("Next = %+v, %v", h, err)
			}
			if r.DataRemaining() != len(payload) {
				t.Fatalf("DataRemaining %d, want %d", r.DataRemaining(), len(payload))
			}
			var got []byte
			for _, c := range tc.chunks {
				before := r.DataRemaining()
				if before > 0 {
					if _, err := r.Next(); err == nil {
						t.Fatalf("Next accepted with %d DATA bytes unread", before)
					}
					if r.DataRemaining() != before {
						t.Fatalf("refused Next changed DataRemaining %d -> %d", before, r.DataRemaining())
					}
					if _, err := r.Payload(h); err == nil {
						t.Fatal("Payload accepted a DATA header")
					}
				}
				buf := make([]byte, c)
				n, err := r.ReadData(buf)
				if want := min(c, before); n != want || err != nil {
					t.Fatalf("ReadData(%d) with %d left = %d, %v; want %d, nil", c, before, n, err, want)
				}
				if r.DataRemaining() != before-n {
					t.Fatalf("DataRemaining %d after reading %d of %d", r.DataRemaining(), n, before)
				}
				got = append(got, buf[:n]...)
			}
			if !bytes.Equal(got, payload) {
				t.Fatalf("payload differs: got %d bytes", len(got))
			}
			// Reading with nothing pending returns nothing and does not
			// consume the next header.
			if n, err := r.ReadData(make([]byte, 8)); n != 0 || err != nil {
				t.Fatalf("ReadData with nothing pending = %d, %v", n, err)
			}
			h, err = r.Next()
			if err != nil || h != (frame.Header{Type: frame.TypePing, Len: 8}) {
				t.Fatalf("next frame %+v, %v", h, err)
			}
			p, err := r.Payload(h)
			if v, perr := frame.ParseU64(p); err != nil || perr != nil || v != 42 {
				t.Fatalf("PING payload %x, %v, %v", p, err, perr)
			}
			h, err = r.Next()
			if err != nil || h.Type != frame.TypeData || h.Len != 2 {
				t.Fatalf("last frame %+v, %v", h, err)
			}
			buf := make([]byte, 2)
			if n, err := r.ReadData(buf); n != 2 || err != nil || string(buf) != "hi" {
				t.Fatalf("last DATA %q, %d, %v", buf, n, err)
			}
			if _, err := r.Next(); err != io.EOF {
				t.Fatalf("end: %v, want io.EOF", err)
			}
		})
	}
}

// TestReaderRejects checks that the Reader validates headers before it
// reads (or waits for) a payload.
func TestReaderRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		hdr  []byte
		err  error
	}{
		{"unknown type", []byte{0x08, 0, 0, 8}, frame.ErrUnknownType},
		{"huge data", []byte{0x01, 0xff, 0xff, 0xff}, frame.ErrLength},
		{"data one over", []byte{0x01, 0x01, 0x00, 0x01}, frame.ErrLength},
		{"empty data", []byte{0x01, 0, 0, 0}, frame.ErrLength},
		{"short ack", []byte{0x02, 0, 0, 16}, frame.ErrLength},
		{"long hello", []byte{0x10, 0, 2, 0x29}, frame.ErrLength}, // 553
	} {
		// The source blocks forever after the header if the reader tries
		// to read a payload: a pipe whose writer never writes again.
		pr, pw := io.Pipe()
		go func() { pw.Write(tc.hdr) }()
		r := frame.NewReader(pr, 16)
		_, err := r.Next()
		if !errors.Is(err, tc.err) || !errors.Is(err, frame.ErrMalformed) {
			t.Errorf("%s: err %v, want %v", tc.name, err, tc.err)
		}
		if r.DataRemaining() != 0 {
			t.Errorf("%s: DataRemaining %d after a rejected header", tc.name, r.DataRemaining())
		}
		pw.Close()
	}
	// Payload refuses DATA and lengths beyond any control frame.
	r := frame.NewReader(strings.NewReader(""), 16)
	for _, h := range []frame.Header{{Type: frame.TypeData, Len: 1}, {Type: frame.TypeHello, Len: wantMaxHello + 1}} {
		if _, err := r.Payload(h); !errors.Is(err, frame.ErrLength) {
			t.Errorf("Payload(%+v): err %v, want ErrLength", h, err)
		}
	}
}

func TestTypeString(t *testing.T) {
	for _, tc := range []struct {
		t         frame.Type
		s         string
		handshake bool
	}{
		{frame.TypeData, "DATA", false},
		{frame.TypeAck, "ACK", false},
		{frame.TypePing, "PING", false},
		{frame.TypePong, "PONG", false},
		{frame.TypeCloseWrite, "CLOSE_WRITE", false},
		{frame.TypeReset, "RESET", false},
		{frame.TypeGoAway, "GOAWAY", false},
		{frame.TypeHello, "HELLO", true},
		{frame.TypeWelcome, "WELCOME", true},
		{frame.TypeResume, "RESUME", true},
		{frame.TypeResumed, "RESUMED", true},
		{frame.TypeReject, "REJECT", true},
		{0x00, "Type(0x00)", false},
		{0x08, "Type(0x08)", false},
		{0x0f, "Type(0x0f)", false},
		{0x15, "Type(0x15)", true},
		{0xff, "Type(0xff)", true},
	} {
		if got := tc.t.String(); got != tc.s {
			t.Errorf("Type(%d).String() = %q, want %q", uint8(tc.t), got, tc.s)
		}
		if got := tc.t.Handshake(); got != tc.handshake {
			t.Errorf("%v.Handshake() = %v, want %v", tc.t, got, tc.handshake)
		}
	}
	// Wire values.
	for _, tc := range []struct {
		t    frame.Type
		wire byte
	}{
		{frame.TypeData, 0x01}, {frame.TypeAck, 0x02}, {frame.TypePing, 0x03}, {frame.TypePong, 0x04},
		{frame.TypeCloseWrite, 0x05}, {frame.TypeReset, 0x06}, {frame.TypeGoAway, 0x07},
		{frame.TypeHello, 0x10}, {frame.TypeWelcome, 0x11}, {frame.TypeResume, 0x12},
		{frame.TypeResumed, 0x13}, {frame.TypeReject, 0x14},
	} {
		if byte(tc.t) != tc.wire {
			t.Errorf("%v = 0x%02x, want 0x%02x", tc.t, byte(tc.t), tc.wire)
		}
	}
}

func TestCodeString(t *testing.T) {
	for _, tc := range []struct {
		c         frame.Code
		wire      uint16
		s         string
		retryable bool
	}{
		{frame.CodeNone, 0, "NONE", false},
		{frame.CodeAccessDenied, 1, "ACCESS_DENIED", false},
		{frame.CodeNotFound, 2, "NOT_FOUND", false},
		{frame.CodeConflict, 3, "CONFLICT", true},
		{frame.CodeThrottled, 4, "THROTTLED", true},
		{frame.CodeValidation, 5, "VALIDATION", false},
		{frame.CodeInternal, 6, "INTERNAL", true},
		{frame.CodeBufferLost, 7, "BUFFER_LOST", false},
		{frame.CodeVersion, 8, "VERSION", false},
		{frame.CodeShuttingDown, 9, "SHUTTING_DOWN", false},
		{frame.CodeTimeout, 10, "TIMEOUT", false},
		{frame.CodeAppReset, 11, "APP_RESET", false},
		{frame.CodeUpstream, 12, "UPSTREAM", false},
		{frame.CodeLimit, 13, "LIMIT", false},
		{frame.CodeNotStarted, 14, "NOT_STARTED", false},
		{15, 15, "Code(15)", false},
		{1000, 1000, "Code(1000)", false},
		{0xffff, 0xffff, "Code(65535)", false},
	} {
		if uint16(tc.c) != tc.wire {
			t.Errorf("%s = %d, want %d", tc.s, uint16(tc.c), tc.wire)
		}
		if got := tc.c.String(); got != tc.s {
			t.Errorf("Code(%d).String() = %q, want %q", tc.wire, got, tc.s)
		}
		if got := tc.c.Retryable(); got != tc.retryable {
			t.Errorf("%v.Retryable() = %v, want %v", tc.c, got, tc.retryable)
		}
	}
}

func TestErrors(t *testing.T) {
	for _, err := range []error{frame.ErrUnknownType, frame.ErrLength} {
		if !errors.Is(err, frame.ErrMalformed) {
			t.Errorf("%v does not wrap ErrMalformed", err)
		}
	}
	if errors.Is(frame.ErrBadMagic, frame.ErrMalformed) {
		t.Error("ErrBadMagic wraps ErrMalformed; a stray probe is not a protocol violation")
	}
}

// TestZeroAlloc pins the hot path: encoding ACKs and DATA headers into a
// reused buffer and decoding DATA and control frames allocate nothing.
func TestZeroAlloc(t *testing.T) {
	buf := make([]byte, 0, 64)
	if n := testing.AllocsPerRun(100, func() {
		buf = frame.AppendAck(buf[:0], frame.Ack{Received: 1, Window: 2})
		buf = frame.AppendDataHeader(buf, 100)
		buf = frame.AppendU64(buf, frame.TypePing, 3)
	}); n != 0 {
		t.Errorf("Append*: %v allocs/op", n)
	}

	var unit []byte
	unit = append(frame.AppendDataHeader(unit, 1000), seq(0, 1000)...)
	unit = frame.AppendAck(unit, frame.Ack{Received: 10, Window: 20, Flags: frame.AckFin})
	unit = frame.AppendU64(unit, frame.TypePong, 77)
	src := &loopReader{buf: unit}
	r := frame.NewReader(src, 4096)
	dst := make([]byte, 512)
	if n := testing.AllocsPerRun(100, func() {
		h, err := r.Next()
		if err != nil || h.Type != frame.TypeData {
			t.Fatalf("%+v, %v", h, err)
		}
		for r.DataRemaining() > 0 {
			if _, err := r.ReadData(dst); err != nil {
				t.Fatal(err)
			}
		}
		h, _ = r.Next()
		p, _ := r.Payload(h)
		if a, err := frame.ParseAck(p); err != nil || a.Window != 20 {
			t.Fatalf("%+v, %v", a, err)
		}
		h, _ = r.Next()
		p, _ = r.Payload(h)
		if v, err := frame.ParseU64(p); err != nil || v != 77 {
			t.Fatalf("%d, %v", v, err)
		}
	}); n != 0 {
		t.Errorf("Reader: %v allocs/op", n)
	}
}

// loopReader returns buf over and over without allocating.
type loopReader struct {
	buf []byte
	off int
}

func (l *loopReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		c := copy(p[n:], l.buf[l.off:])
		n += c
		l.off = (l.off + c) % len(l.buf)
	}
	return n, nil
}
