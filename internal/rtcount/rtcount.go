// Package rtcount counts the round trips a rueidis client makes, for tests
// and the bench: one per Do, one per DoMulti (a pipelined write, a
// MULTI/EXEC block among it, is one round trip), and so on.
package rtcount

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// Client is a rueidis.Client that counts its round trips, those of its
// dedicated connections included (the drains of ordered queues use one).
type Client struct {
	rueidis.Client
	n      *atomic.Int64
	onTrip func(cmds [][]string, res []rueidis.RedisResult)
}

// Wrap returns c counting its round trips. onTrip, if not nil, is called
// after each with its commands (copied before they are sent: rueidis
// recycles them) and their replies (none for streams and Receive).
func Wrap(c rueidis.Client, onTrip func(cmds [][]string, res []rueidis.RedisResult)) *Client {
	return &Client{Client: c, n: new(atomic.Int64), onTrip: onTrip}
}

// Into returns c adding its round trips to n, which other clients may
// share, and doing nothing more.
func Into(c rueidis.Client, n *atomic.Int64) *Client {
	return &Client{Client: c, n: n}
}

// Trips returns the round trips made so far.
func (c *Client) Trips() int64 { return c.n.Load() }

// args copies the arguments of cmds, when there is a hook to give them to.
func (c *Client) args(cmds ...rueidis.Completed) [][]string {
	if c.onTrip == nil {
		return nil
	}
	out := make([][]string, len(cmds))
	for i, cmd := range cmds {
		out[i] = append([]string(nil), cmd.Commands()...)
	}
	return out
}

func (c *Client) trip(args [][]string, res []rueidis.RedisResult) {
	c.n.Add(1)
	if c.onTrip != nil {
		c.onTrip(args, res)
	}
}

func (c *Client) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	a := c.args(cmd)
	r := c.Client.Do(ctx, cmd)
	c.trip(a, []rueidis.RedisResult{r})
	return r
}

func (c *Client) DoMulti(ctx context.Context, multi ...rueidis.Completed) []rueidis.RedisResult {
	a := c.args(multi...)
	res := c.Client.DoMulti(ctx, multi...)
	if len(multi) > 0 {
		c.trip(a, res)
	}
	return res
}

func (c *Client) DoCache(ctx context.Context, cmd rueidis.Cacheable, ttl time.Duration) rueidis.RedisResult {
	a := c.args(rueidis.Completed(cmd))
	r := c.Client.DoCache(ctx, cmd, ttl)
	c.trip(a, []rueidis.RedisResult{r})
	return r
}

func (c *Client) DoMultiCache(ctx context.Context, multi ...rueidis.CacheableTTL) []rueidis.RedisResult {
	cmds := make([]rueidis.Completed, len(multi))
	for i, m := range multi {
		cmds[i] = rueidis.Completed(m.Cmd)
	}
	a := c.args(cmds...)
	res := c.Client.DoMultiCache(ctx, multi...)
	if len(multi) > 0 {
		c.trip(a, res)
	}
	return res
}

func (c *Client) DoStream(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResultStream {
	c.trip(c.args(cmd), nil)
	return c.Client.DoStream(ctx, cmd)
}

func (c *Client) DoMultiStream(ctx context.Context, multi ...rueidis.Completed) rueidis.MultiRedisResultStream {
	if len(multi) > 0 {
		c.trip(c.args(multi...), nil)
	}
	return c.Client.DoMultiStream(ctx, multi...)
}

func (c *Client) Receive(ctx context.Context, subscribe rueidis.Completed, fn func(msg rueidis.PubSubMessage)) error {
	c.trip(c.args(subscribe), nil)
	return c.Client.Receive(ctx, subscribe, fn)
}

func (c *Client) Dedicated(fn func(rueidis.DedicatedClient) error) error {
	return c.Client.Dedicated(func(d rueidis.DedicatedClient) error {
		return fn(&dedicated{DedicatedClient: d, c: c})
	})
}

func (c *Client) Dedicate() (rueidis.DedicatedClient, func()) {
	d, cancel := c.Client.Dedicate()
	return &dedicated{DedicatedClient: d, c: c}, cancel
}

// dedicated is a dedicated connection of c, counting its round trips as
// c's.
type dedicated struct {
	rueidis.DedicatedClient
	c *Client
}

func (d *dedicated) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	a := d.c.args(cmd)
	r := d.DedicatedClient.Do(ctx, cmd)
	d.c.trip(a, []rueidis.RedisResult{r})
	return r
}

func (d *dedicated) DoMulti(ctx context.Context, multi ...rueidis.Completed) []rueidis.RedisResult {
	a := d.c.args(multi...)
	res := d.DedicatedClient.DoMulti(ctx, multi...)
	if len(multi) > 0 {
		d.c.trip(a, res)
	}
	return res
}
