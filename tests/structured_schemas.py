"""A shared set of pydantic v2 models for structured output (issue 12): the schemas the grammar-backend benchmark
(benchmarks/grammar_backends.py) compiles and the server tests send through `client.chat.completions.parse`.

Each model is small enough for a 135M-parameter chat model to fill in well under ~120 tokens. Together they cover
the JSON-Schema shapes pydantic emits: nested objects, arrays with minItems/maxItems, enums (Enum, IntEnum, Literal),
integer/number bounds (minimum/maximum, exclusive bounds, multipleOf), optional and nullable fields, defaults,
string formats (date, date-time, time, email, uuid, uri), patterns and min/max length, unions (anyOf, a
discriminated oneOf), $defs/$ref reuse, additionalProperties (dict[str, int]), prefixItems (tuples), recursion
and booleans.

Exports:
    SCHEMA_MODELS: every model class, in a fixed order.
    EXAMPLES: class name -> a hand-made valid instance (built through the model, so pydantic validates it).
    PROMPTS: class name -> a short natural-language request for that object.
"""

from __future__ import annotations

import datetime
import uuid
from enum import Enum, IntEnum
from typing import Annotated, Literal

from pydantic import AnyUrl, BaseModel, EmailStr, Field


# --------------------------------------------------------------------------------------------- flat objects
class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)


class Flags(BaseModel):
    is_active: bool
    is_admin: bool
    has_newsletter: bool


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: float = Field(ge=0.0, le=1.0)


class Temperature(BaseModel):
    city: str = Field(min_length=1, max_length=40)
    celsius: float = Field(ge=-90, le=60)
    unit: Literal["C"] = "C"


class Product(BaseModel):
    name: str
    price: float = Field(gt=0, lt=10000)
    quantity: int = Field(ge=1, le=100)
    # multipleOf: only some grammar backends enforce it.
    pack_size: int = Field(multiple_of=6, ge=6, le=48)


# -------------------------------------------------------------------------------------------------- enums
class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Priority(IntEnum):
    low = 1
    medium = 2
    high = 3


class Paint(BaseModel):
    color: Color
    finish: Literal["matte", "satin", "gloss"]
    liters: int = Field(ge=1, le=20)


class Task(BaseModel):
    title: str = Field(max_length=60)
    priority: Priority
    done: bool = False


class Genre(str, Enum):
    comedy = "comedy"
    drama = "drama"
    horror = "horror"
    scifi = "sci-fi"


class Movie(BaseModel):
    title: str
    genres: list[Genre] = Field(min_length=1, max_length=3)
    rating: float | None = Field(default=None, ge=0, le=10)


# ----------------------------------------------------------------------------------------- string formats
class Event(BaseModel):
    name: str
    day: datetime.date
    starts_at: datetime.datetime


class Alarm(BaseModel):
    label: str
    at: datetime.time


class Contact(BaseModel):
    name: str
    email: EmailStr


class Ticket(BaseModel):
    ticket_id: uuid.UUID
    summary: str = Field(max_length=80)


class Bookmark(BaseModel):
    title: str
    url: AnyUrl


class Account(BaseModel):
    username: str = Field(pattern=r"^[a-z][a-z0-9_]{2,15}$")
    pin: str = Field(pattern=r"^[0-9]{4}$")
    bio: str = Field(min_length=3, max_length=50)


# ------------------------------------------------------------------------------------ optional and defaults
class Book(BaseModel):
    title: str
    subtitle: str | None = None
    year: int | None = Field(default=None, ge=1450, le=2100)


class Settings(BaseModel):
    theme: Literal["light", "dark"] = "dark"
    volume: int = Field(default=5, ge=0, le=10)
    notifications: bool = True
    language: str = "en"


class Profile(BaseModel):
    # Required but nullable: the key must be present, its value may be null.
    nickname: str | None
    age: int | None


# ------------------------------------------------------------------------------------------------- arrays
class ShoppingList(BaseModel):
    items: list[str] = Field(min_length=1, max_length=5)


class Recipe(BaseModel):
    name: str
    ingredients: list[str] = Field(min_length=2, max_length=6)
    minutes: int = Field(gt=0, lt=600)


class LineItem(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{3}$")
    quantity: int = Field(ge=1, le=9)


class Order(BaseModel):
    order_number: int = Field(ge=1)
    items: list[LineItem] = Field(min_length=1, max_length=3)
    express: bool


# ------------------------------------------------------------------------------------- nesting and $refs
class Address(BaseModel):
    street: str
    city: str
    postcode: str = Field(pattern=r"^[0-9]{5}$")


class Customer(BaseModel):
    name: str
    address: Address


class Point(BaseModel):
    x: float
    y: float


class Route(BaseModel):
    # Point is one $defs entry used twice through $ref.
    start: Point
    end: Point
    distance_km: float = Field(ge=0)


class Team(BaseModel):
    name: str
    lead: Person
    members: list[Person] = Field(max_length=3)


# -------------------------------------------------------------------------------------------------- unions
class Circle(BaseModel):
    radius: float = Field(gt=0)


class Rectangle(BaseModel):
    width: float = Field(gt=0)
    height: float = Field(gt=0)


class Drawing(BaseModel):
    # anyOf of two object shapes.
    shape: Circle | Rectangle
    label: str


class Measurement(BaseModel):
    # anyOf of primitive types.
    value: int | str
    unit: str | None = None


class Cat(BaseModel):
    kind: Literal["cat"]
    indoor: bool


class Dog(BaseModel):
    kind: Literal["dog"]
    breed: str


class PetOwner(BaseModel):
    # A discriminated union: oneOf with a discriminator mapping.
    owner: str
    pet: Annotated[Cat | Dog, Field(discriminator="kind")]


# ---------------------------------------------------------------------------- additionalProperties, tuples
class WordCounts(BaseModel):
    counts: dict[str, int]


class Pixel(BaseModel):
    position: tuple[int, int]
    rgb: tuple[Annotated[int, Field(ge=0, le=255)], Annotated[int, Field(ge=0, le=255)],
               Annotated[int, Field(ge=0, le=255)]]


# ---------------------------------------------------------------------------------------------- recursion
class TreeNode(BaseModel):
    # Self-reference through $ref; prompts and examples keep the depth to 2.
    name: str
    children: list[TreeNode] = Field(default_factory=list, max_length=3)


class Comment(BaseModel):
    author: str
    text: str = Field(max_length=80)
    reply: Comment | None = None


SCHEMA_MODELS: list[type[BaseModel]] = [
    Person, Flags, Sentiment, Temperature, Product,
    Paint, Task, Movie,
    Event, Alarm, Contact, Ticket, Bookmark, Account,
    Book, Settings, Profile,
    ShoppingList, Recipe, Order,
    Customer, Route, Team,
    Drawing, Measurement, PetOwner,
    WordCounts, Pixel,
    TreeNode, Comment,
]

EXAMPLES: dict[str, BaseModel] = {
    "Person": Person(name="Ada Lovelace", age=36),
    "Flags": Flags(is_active=True, is_admin=False, has_newsletter=True),
    "Sentiment": Sentiment(label="positive", confidence=0.92),
    "Temperature": Temperature(city="Oslo", celsius=-3.5),
    "Product": Product(name="Sparkling water", price=4.99, quantity=2, pack_size=12),
    "Paint": Paint(color=Color.blue, finish="matte", liters=5),
    "Task": Task(title="Water the plants", priority=Priority.high),
    "Movie": Movie(title="Alien", genres=[Genre.horror, Genre.scifi], rating=8.5),
    "Event": Event(name="Team lunch", day=datetime.date(2025, 6, 12),
                   starts_at=datetime.datetime(2025, 6, 12, 12, 30, tzinfo=datetime.timezone.utc)),
    # JSON Schema's "time" format is RFC 3339 full-time: the offset is required, so the example has one.
    "Alarm": Alarm(label="Wake up", at=datetime.time(6, 45, tzinfo=datetime.timezone.utc)),
    "Contact": Contact(name="Grace Hopper", email="grace@example.com"),
    "Ticket": Ticket(ticket_id=uuid.UUID("1b4e28ba-2fa1-11d2-883f-0016d3cca427"), summary="Printer is jammed"),
    "Bookmark": Bookmark(title="Python docs", url="https://docs.python.org/3/"),
    "Account": Account(username="ada_l", pin="1815", bio="Writes programs."),
    "Book": Book(title="Dune", year=1965),
    "Settings": Settings(theme="light", volume=7),
    "Profile": Profile(nickname=None, age=29),
    "ShoppingList": ShoppingList(items=["milk", "eggs", "bread"]),
    "Recipe": Recipe(name="Pancakes", ingredients=["flour", "milk", "eggs"], minutes=20),
    "Order": Order(order_number=1042, items=[LineItem(sku="ABC-123", quantity=2)], express=False),
    "Customer": Customer(name="Alan Turing", address=Address(street="1 Main St", city="Wilmslow", postcode="12345")),
    "Route": Route(start=Point(x=0.0, y=0.0), end=Point(x=3.0, y=4.0), distance_km=5.0),
    "Team": Team(name="Compilers", lead=Person(name="Grace", age=45), members=[Person(name="Bob", age=30)]),
    "Drawing": Drawing(shape=Circle(radius=2.5), label="sun"),
    "Measurement": Measurement(value=42, unit="kg"),
    "PetOwner": PetOwner(owner="Sam", pet=Dog(kind="dog", breed="beagle")),
    "WordCounts": WordCounts(counts={"the": 3, "cat": 1}),
    "Pixel": Pixel(position=(10, 20), rgb=(255, 128, 0)),
    "TreeNode": TreeNode(name="root", children=[TreeNode(name="a"), TreeNode(name="b")]),
    "Comment": Comment(author="kim", text="Nice post!", reply=Comment(author="lee", text="Thanks!")),
}

PROMPTS: dict[str, str] = {
    "Person": "Give a JSON person with a name and an age.",
    "Flags": "Give JSON flags for a user who is active, not an admin, and subscribed to the newsletter.",
    "Sentiment": "Classify the sentiment of 'I love this phone' as JSON with a label and a confidence.",
    "Temperature": "Give the temperature in Oslo today as JSON in Celsius.",
    "Product": "Describe a product for sale as JSON: name, price, quantity and pack size.",
    "Paint": "Pick a paint as JSON: color, finish and liters.",
    "Task": "Give a to-do task as JSON with a title and a priority from 1 to 3.",
    "Movie": "Describe a movie as JSON with its title, genres and rating.",
    "Event": "Give a calendar event as JSON: name, day and start time.",
    "Alarm": "Set an alarm as JSON with a label and a time.",
    "Contact": "Give a contact as JSON with a name and an email address.",
    "Ticket": "Open a support ticket as JSON with an id and a short summary.",
    "Bookmark": "Give a bookmark as JSON with a title and a URL.",
    "Account": "Create a user account as JSON: a lowercase username, a 4-digit pin and a short bio.",
    "Book": "Describe a book as JSON with its title and publication year.",
    "Settings": "Give app settings as JSON: theme, volume, notifications and language.",
    "Profile": "Give a user profile as JSON with a nickname and an age.",
    "ShoppingList": "Write a short shopping list as JSON.",
    "Recipe": "Give a simple recipe as JSON: name, ingredients and minutes to cook.",
    "Order": "Create a shop order as JSON with an order number, line items and an express flag.",
    "Customer": "Give a customer as JSON with a name and a postal address.",
    "Route": "Give a route between two points as JSON with its distance in km.",
    "Team": "Describe a small team as JSON: a name, a lead and members.",
    "Drawing": "Describe a drawing of a circle or a rectangle as JSON with a label.",
    "Measurement": "Give a measurement as JSON with a value and a unit.",
    "PetOwner": "Describe a pet owner and their cat or dog as JSON.",
    "WordCounts": "Count the words in 'the cat saw the dog' as JSON.",
    "Pixel": "Give a pixel as JSON with an x, y position and an RGB color.",
    "TreeNode": "Give a small tree as JSON: a root node with two children.",
    "Comment": "Give a blog comment and one reply to it as JSON.",
}
