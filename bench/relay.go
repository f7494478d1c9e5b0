package main

import (
	"context"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
)

// serveConns is the server loop of the relay children: it listens on the
// Unix socket, runs handle for each connection on a goroutine of its own,
// and returns at SIGTERM/SIGINT after closing the connections and waiting
// for their handlers.
func serveConns(socket string, handle func(ctx context.Context, c net.Conn)) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		lis.Close()
	}()
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	defer func() {
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()
	for {
		c, err := lis.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		mu.Lock()
		conns[c] = true
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			handle(ctx, c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			c.Close()
		}()
	}
}
