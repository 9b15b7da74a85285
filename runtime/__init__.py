"""chatfn's host side: users, sessions, apps, deployments, and the interfaces to them."""
