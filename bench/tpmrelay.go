package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/keyd-dev/keyd/client"
)

// serveTPMRelay is the TPM relay child, started as
//
//	bench -tpm-relay SOCKET HOST:PORT
//
// It is the least a daemon between a caller and the TPM can be: it accepts
// connections on a Unix socket and forwards each TPM command, byte for byte,
// to the TPM at HOST:PORT over a connection of its own, then the response
// back. No gRPC, no policy, no parsing beyond the 10-byte header that gives
// the length. tpmInterleaved measures TPM2_Sign through it beside direct
// TPM2_Sign: what one more local process hop adds on this machine, what the
// least daemon in the path adds.
//
// Each connection has its own connection to the TPM (swtpm serves one at a
// time, so one caller at a time). It serves until SIGTERM/SIGINT (see
// serveConns).
func serveTPMRelay(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: bench -tpm-relay SOCKET HOST:PORT")
	}
	socket, tpmAddr := args[0], args[1]
	return serveConns(socket, func(ctx context.Context, c net.Conn) {
		if err := relayConn(ctx, c, tpmAddr); err != nil && ctx.Err() == nil {
			fmt.Fprintf(os.Stderr, "bench tpm relay: %v\n", err)
		}
	})
}

// relayConn forwards the TPM commands of one caller connection to a new
// connection to the TPM, until the caller hangs up.
func relayConn(ctx context.Context, c net.Conn, tpmAddr string) error {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var dl net.Dialer
	t, err := dl.DialContext(dctx, "tcp", tpmAddr)
	if err != nil {
		return err
	}
	defer t.Close()
	cmd := make([]byte, tpmMaxMessage)
	rsp := make([]byte, tpmMaxMessage)
	for {
		m, err := readTPMMessage(c, cmd)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("from the caller: %w", err)
		}
		if _, err := t.Write(m); err != nil {
			return fmt.Errorf("to the TPM: %w", err)
		}
		r, err := readTPMMessage(t, rsp)
		if err != nil {
			return fmt.Errorf("from the TPM: %w", err)
		}
		if _, err := c.Write(r); err != nil {
			return fmt.Errorf("to the caller: %w", err)
		}
	}
}

// tpmMaxMessage bounds a TPM command or response the relay forwards.
const tpmMaxMessage = 64 << 10

// readTPMMessage reads one TPM command or response (tag, size, code, ...)
// into buf, which holds tpmMaxMessage bytes, and returns it.
func readTPMMessage(r io.Reader, buf []byte) ([]byte, error) {
	if _, err := io.ReadFull(r, buf[:10]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(buf[2:6]))
	if n < 10 || n > len(buf) {
		return nil, fmt.Errorf("TPM message header claims %d bytes", n)
	}
	if _, err := io.ReadFull(r, buf[10:n]); err != nil {
		return nil, fmt.Errorf("TPM message of %d bytes: %w", n, err)
	}
	return buf[:n], nil
}

// serveTPMGRPCRelay is the gRPC TPM relay child, started as
//
//	bench -tpm-grpc-relay SOCKET HOST:PORT
//
// It is serveTPMRelay over keyd's transport: a gRPC server on a Unix socket
// made like keyd's, with keyd's transport options (daemon.ServerOptions)
// and none of its interceptors, whose one method is a bidirectional stream,
// as keyd's SignStream: each message carries a TPM command, as bytes, which
// it forwards to the TPM at HOST:PORT, and the response goes back as the
// next message. What it adds to a TPM2_Sign is what gRPC adds, with nothing
// of keyd's own.
//
// It serves until SIGTERM/SIGINT.
func serveTPMGRPCRelay(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: bench -tpm-grpc-relay SOCKET HOST:PORT")
	}
	socket, tpmAddr := args[0], args[1]
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return serveGRPC(ctx, socket, func(g *grpc.Server) { g.RegisterService(&tpmRelayDesc, tpmAddr) })
}

// relayStream serves one stream of the gRPC relay over a connection of its
// own to the TPM at tpmAddr.
func relayStream(tpmAddr string, stream grpc.ServerStream) error {
	var dl net.Dialer
	t, err := dl.DialContext(stream.Context(), "tcp", tpmAddr)
	if err != nil {
		return status.Error(codes.Unavailable, err.Error())
	}
	defer t.Close()
	buf := make([]byte, tpmMaxMessage)
	for {
		in := new(wrapperspb.BytesValue)
		if err := stream.RecvMsg(in); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		_, err := t.Write(in.Value)
		var rsp []byte
		if err == nil {
			rsp, err = readTPMMessage(t, buf)
		}
		if err != nil {
			return status.Error(codes.Unavailable, err.Error())
		}
		if err := stream.SendMsg(wrapperspb.Bytes(rsp)); err != nil {
			return err
		}
	}
}

// tpmRelayMethod is the gRPC relay's one method.
const tpmRelayMethod = "/keydbench.TPMRelay/Relay"

var tpmRelayDesc = grpc.ServiceDesc{
	ServiceName: "keydbench.TPMRelay",
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{{
		StreamName:    "Relay",
		ServerStreams: true,
		ClientStreams: true,
		Handler: func(srv any, stream grpc.ServerStream) error {
			return relayStream(srv.(string), stream)
		},
	}},
}

// grpcTPMConn is the caller's side of the gRPC relay, as tpmDirect's
// connection: Write sends a command on the stream and waits for the
// response, which Read then returns.
type grpcTPMConn struct {
	cl     *client.Client
	stream grpc.ClientStream
	cancel context.CancelFunc
	rsp    []byte
}

func dialGRPCTPM(socket string) (*grpcTPMConn, error) {
	cl, err := client.Dial(socket)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := cl.Conn().NewStream(ctx, &tpmRelayDesc.Streams[0], tpmRelayMethod)
	if err != nil {
		cancel()
		cl.Close()
		return nil, err
	}
	return &grpcTPMConn{cl: cl, stream: stream, cancel: cancel}, nil
}

func (g *grpcTPMConn) Write(p []byte) (int, error) {
	if err := g.stream.SendMsg(wrapperspb.Bytes(p)); err != nil {
		return 0, err
	}
	out := new(wrapperspb.BytesValue)
	if err := g.stream.RecvMsg(out); err != nil {
		return 0, err
	}
	g.rsp = out.Value
	return len(p), nil
}

func (g *grpcTPMConn) Read(p []byte) (int, error) {
	if len(g.rsp) == 0 {
		return 0, io.EOF
	}
	n := copy(p, g.rsp)
	g.rsp = g.rsp[n:]
	return n, nil
}

// SetDeadline does nothing: the relay's calls end with the stream.
func (g *grpcTPMConn) SetDeadline(time.Time) error { return nil }

func (g *grpcTPMConn) Close() error {
	g.stream.CloseSend()
	g.cancel()
	return g.cl.Close()
}
