package frame_test

import (
	"bytes"
	"fmt"
	"io"

	"github.com/lifeline-proxy/lifeline/frame"
)

// Example encodes a link's opening bytes, an ACK, a DATA frame and a PING,
// then decodes them with a Reader.
func Example() {
	var link bytes.Buffer

	// Sender: the client writes the preamble once per link, then frames.
	var buf []byte
	buf = frame.AppendPreamble(buf)
	buf = frame.AppendAck(buf, frame.Ack{Received: 4096, Window: 4096 + 2<<20})
	buf = frame.AppendDataHeader(buf, 5)
	buf = append(buf, "hello"...)
	buf = frame.AppendU64(buf, frame.TypePing, 42)
	link.Write(buf)
	fmt.Printf("ACK on the wire: % x\n", buf[frame.PreambleLen:frame.PreambleLen+frame.HeaderLen+frame.AckLen])

	// Receiver.
	r := frame.NewReader(&link, 4096)
	v, err := r.ReadPreamble()
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("version", v)
	data := make([]byte, 2) // small on purpose: DATA is read in pieces
	for {
		h, err := r.Next()
		if err == io.EOF {
			fmt.Println("end of link")
			return
		}
		if err != nil {
			fmt.Println(err)
			return
		}
		switch h.Type {
		case frame.TypeData:
			fmt.Printf("DATA %d bytes:", h.Len)
			for r.DataRemaining() > 0 {
				n, err := r.ReadData(data)
				if err != nil {
					fmt.Println(err)
					return
				}
				fmt.Printf(" %q", data[:n])
			}
			fmt.Println()
		case frame.TypeAck:
			p, _ := r.Payload(h)
			a, err := frame.ParseAck(p)
			fmt.Printf("ACK received=%d window=%d flags=%d err=%v\n", a.Received, a.Window, a.Flags, err)
		case frame.TypePing:
			p, _ := r.Payload(h)
			t, err := frame.ParseU64(p)
			fmt.Printf("PING %d err=%v\n", t, err)
		}
	}
	// Output:
	// ACK on the wire: 02 00 00 11 00 00 00 00 00 00 10 00 00 00 00 00 00 20 10 00 00
	// version 2
	// ACK received=4096 window=2101248 flags=0 err=<nil>
	// DATA 5 bytes: "he" "ll" "o"
	// PING 42 err=<nil>
	// end of link
}
