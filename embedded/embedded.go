// Package embedded starts an in-process Redis (miniredis) and a rueidis
// client connected to it, for demos and tests that should run without a
// Redis server. Nothing it stores survives the process, and its Lua runs
// thousands of scripts per second, not tens of thousands: use a real Redis
// in production.
package embedded

import (
	"fmt"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/rueidis"
)

// Redis is an in-process Redis server and a client connected to it.
type Redis struct {
	// Client is connected to Server, with client-side caching disabled.
	Client rueidis.Client
	// Server is the miniredis instance; tests may use it to inspect keys or
	// move its clock.
	Server *miniredis.Miniredis
}

// Start starts an in-process Redis on a free loopback port and connects a
// client to it. Close stops both.
func Start() (*Redis, error) {
	s, err := miniredis.Run()
	if err != nil {
		return nil, fmt.Errorf("embedded: start miniredis: %w", err)
	}
	c, err := rueidis.NewClient(rueidis.ClientOption{
		InitAddress:  []string{s.Addr()},
		DisableCache: true, // miniredis has no client-side caching (RESP3 CLIENT TRACKING)
	})
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("embedded: connect to miniredis: %w", err)
	}
	return &Redis{Client: c, Server: s}, nil
}

// Addr returns the server's address, for other clients.
func (r *Redis) Addr() string { return r.Server.Addr() }

// Close closes the client and stops the server.
func (r *Redis) Close() {
	r.Client.Close()
	r.Server.Close()
}
