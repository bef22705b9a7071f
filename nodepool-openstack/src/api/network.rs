//! Neutron (network v2.0): networks, ports, floating IPs.

use reqwest::Method;
use serde_json::{Value, json};

use super::{ApiRequest, ApiResponse, Endpoint, Service, segment, str_field};
use crate::error::ApiError;

/// A network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `router:external`.
    pub external: bool,
}

/// `GET /v2.0/networks`, optionally filtered.
#[derive(Clone, Debug, Default)]
pub struct ListNetworks {
    /// Only networks with this name.
    pub name: Option<String>,
    /// Only networks with this id.
    pub id: Option<String>,
    /// Only external networks.
    pub external_only: bool,
}

impl Endpoint for ListNetworks {
    type Output = Vec<Network>;

    fn request(&self) -> ApiRequest {
        let mut r = ApiRequest::get(Service::Network, "networks");
        if let Some(n) = &self.name {
            r = r.query("name", n.clone());
        }
        if let Some(id) = &self.id {
            r = r.query("id", id.clone());
        }
        if self.external_only {
            r = r.query("router:external", "true");
        }
        r
    }

    fn parse(&self, response: ApiResponse) -> Result<Vec<Network>, ApiError> {
        let v = response.json()?;
        Ok(v.get("networks")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::Decode("no `networks` in the answer".into()))?
            .iter()
            .filter_map(|n| {
                Some(Network {
                    id: str_field(n, "id")?,
                    name: str_field(n, "name").unwrap_or_default(),
                    external: n
                        .get("router:external")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                })
            })
            .collect())
    }
}

/// A port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Id.
    pub id: String,
    /// `ACTIVE`, `DOWN`, `BUILD`.
    pub status: String,
    /// `compute:nova`, `network:router_interface`, empty...
    pub device_owner: String,
    /// Server (or router) id.
    pub device_id: String,
}

/// `GET /v2.0/ports`, optionally filtered.
#[derive(Clone, Debug, Default)]
pub struct ListPorts {
    /// Only ports of this device (server id).
    pub device_id: Option<String>,
    /// Only ports in this status.
    pub status: Option<String>,
}

impl Endpoint for ListPorts {
    type Output = Vec<Port>;

    fn request(&self) -> ApiRequest {
        let mut r = ApiRequest::get(Service::Network, "ports");
        if let Some(d) = &self.device_id {
            r = r.query("device_id", d.clone());
        }
        if let Some(s) = &self.status {
            r = r.query("status", s.clone());
        }
        r
    }

    fn parse(&self, response: ApiResponse) -> Result<Vec<Port>, ApiError> {
        let v = response.json()?;
        Ok(v.get("ports")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::Decode("no `ports` in the answer".into()))?
            .iter()
            .filter_map(|p| {
                Some(Port {
                    id: str_field(p, "id")?,
                    status: str_field(p, "status").unwrap_or_default(),
                    device_owner: str_field(p, "device_owner").unwrap_or_default(),
                    device_id: str_field(p, "device_id").unwrap_or_default(),
                })
            })
            .collect())
    }
}

/// `DELETE /v2.0/ports/{id}`.
#[derive(Clone, Debug)]
pub struct DeletePort<'a>(pub &'a str);

impl Endpoint for DeletePort<'_> {
    type Output = ();

    fn request(&self) -> ApiRequest {
        ApiRequest::new(
            Method::DELETE,
            Service::Network,
            format!("ports/{}", segment(self.0)),
        )
        .expect(&[204])
    }

    fn parse(&self, _: ApiResponse) -> Result<(), ApiError> {
        Ok(())
    }
}

/// A floating IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloatingIp {
    /// Id.
    pub id: String,
    /// The public address.
    pub address: String,
    /// The port it is attached to.
    pub port_id: Option<String>,
    /// `ACTIVE`, `DOWN`, `ERROR`.
    pub status: String,
}

fn floating_ip(v: &Value) -> Option<FloatingIp> {
    Some(FloatingIp {
        id: str_field(v, "id")?,
        address: str_field(v, "floating_ip_address").unwrap_or_default(),
        port_id: str_field(v, "port_id"),
        status: str_field(v, "status").unwrap_or_default(),
    })
}

/// `GET /v2.0/floatingips`, optionally by port.
#[derive(Clone, Debug, Default)]
pub struct ListFloatingIps {
    /// Only the floating IPs of this port.
    pub port_id: Option<String>,
}

impl Endpoint for ListFloatingIps {
    type Output = Vec<FloatingIp>;

    fn request(&self) -> ApiRequest {
        let mut r = ApiRequest::get(Service::Network, "floatingips");
        if let Some(p) = &self.port_id {
            r = r.query("port_id", p.clone());
        }
        r
    }

    fn parse(&self, response: ApiResponse) -> Result<Vec<FloatingIp>, ApiError> {
        let v = response.json()?;
        Ok(v.get("floatingips")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::Decode("no `floatingips` in the answer".into()))?
            .iter()
            .filter_map(floating_ip)
            .collect())
    }
}

/// `POST /v2.0/floatingips`: allocate one on a network and attach it to a port.
#[derive(Clone, Debug)]
pub struct CreateFloatingIp {
    /// External network id.
    pub network_id: String,
    /// Port to attach it to.
    pub port_id: String,
}

impl Endpoint for CreateFloatingIp {
    type Output = FloatingIp;

    fn request(&self) -> ApiRequest {
        ApiRequest::new(Method::POST, Service::Network, "floatingips")
            .json(json!({"floatingip": {
                "floating_network_id": self.network_id,
                "port_id": self.port_id,
            }}))
            .expect(&[201])
    }

    fn parse(&self, response: ApiResponse) -> Result<FloatingIp, ApiError> {
        let v = response.json()?;
        v.get("floatingip")
            .and_then(floating_ip)
            .ok_or_else(|| ApiError::Decode("no `floatingip` in the answer".into()))
    }
}

/// `DELETE /v2.0/floatingips/{id}`.
#[derive(Clone, Debug)]
pub struct DeleteFloatingIp<'a>(pub &'a str);

impl Endpoint for DeleteFloatingIp<'_> {
    type Output = ();

    fn request(&self) -> ApiRequest {
        ApiRequest::new(
            Method::DELETE,
            Service::Network,
            format!("floatingips/{}", segment(self.0)),
        )
        .expect(&[204])
    }

    fn parse(&self, _: ApiResponse) -> Result<(), ApiError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RequestBody;

    #[test]
    fn shapes() {
        let r = ListNetworks {
            name: Some("private".into()),
            external_only: false,
            id: None,
        }
        .request();
        assert_eq!(r.describe(), "network GET networks");
        assert_eq!(r.query, vec![("name".to_owned(), "private".to_owned())]);
        let r = CreateFloatingIp {
            network_id: "ext".into(),
            port_id: "p".into(),
        }
        .request();
        let RequestBody::Json(b) = r.body else {
            panic!()
        };
        assert_eq!(
            b,
            json!({"floatingip": {"floating_network_id": "ext", "port_id": "p"}})
        );
        assert_eq!(
            ListPorts {
                status: Some("DOWN".into()),
                device_id: None
            }
            .request()
            .query,
            vec![("status".to_owned(), "DOWN".to_owned())]
        );
        assert_eq!(DeletePort("x").request().expected, &[204]);
    }
}
