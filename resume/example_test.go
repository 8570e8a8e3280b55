package resume_test

import (
	"context"
	"fmt"
	"io"
	"net"

	"github.com/lifeline-proxy/lifeline/resume"
)

// A session over loopback TCP whose link is cut in the middle: the bytes
// written before, during and after the cut arrive once, in order.
func Example() {
	srv, _ := resume.NewServer(resume.DefaultServerConfig())
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	served := make(chan struct{})
	go func() { srv.Serve(ln); close(served) }()
	defer func() { srv.Close(); <-served }()

	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", ln.Addr().String())
	}
	client, err := resume.Dial(context.Background(), dial, "echo", resume.DefaultConfig())
	if err != nil {
		fmt.Println(err)
		return
	}
	gateway, _ := srv.Accept()

	client.Write([]byte("before the cut, "))
	client.Kill() // the network drops the link; the client dials a new one
	client.Write([]byte("after the cut"))
	client.CloseWrite()

	got, _ := io.ReadAll(gateway)
	fmt.Printf("%s\n", got)
	gateway.Close()
	client.Close()
	fmt.Println("resumes:", client.Stats().Resumes)
	// Output:
	// before the cut, after the cut
	// resumes: 1
}
